//! Temporary directories for tests, removed when dropped: at the end of the test that owns
//! one, whether it passes or fails (a failing test unwinds and drops its locals). Std only, so
//! every test file can use it whatever features it is built with: `mod support_tmp;` from a file
//! in `tests/`; tests/support and tests/support_redis include it and re-export [`TestDir`]
//! (tests/support_fleet and tests/support_run use tests/support's).
//!
//! A directory handed to a child process (a proxy's config, its keyring) must outlive the
//! child: declare the [`TestDir`] before the guard that kills the child (locals drop in reverse
//! order), or, in a struct that holds both, put the child's field first (fields drop in order).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A fresh empty directory `countersign-{tag}-…` under the system temp dir (`TMPDIR`), removed
/// with everything in it on drop. Derefs to its [`Path`].
#[derive(Debug)]
#[must_use = "the directory is removed when this is dropped"]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates the directory; the name is unique to this process (its id, a counter) and to
    /// this run (the time), so a directory left by a killed earlier run is never reused.
    pub fn new(tag: &str) -> TestDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "countersign-{tag}-{}-{}-{nanos:08x}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TestDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<std::ffi::OsStr> for TestDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.path.as_os_str()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

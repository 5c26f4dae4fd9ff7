//! `dev::start` refusing its options leaves nothing running behind: a test binary of its own,
//! so that no other test's listeners are counted with its own.
//! Run: `cargo test --all-features --test proxy_dev_start`.
#![cfg(all(feature = "proxy", target_os = "linux"))]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use countersign::proxy::dev::{self, DevOptions};

/// The TCP sockets of this process in the LISTEN state (Linux: the inodes of
/// /proc/net/tcp{,6} in state 0A that one of this process's descriptors refers to).
fn listening_sockets() -> usize {
    let mut listening = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) == Some(&"0A") {
                if let Some(inode) = fields.get(9) {
                    listening.insert(format!("socket:[{inode}]"));
                }
            }
        }
    }
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| listening.contains(target.to_string_lossy().as_ref()))
        .count()
}

/// A `--static-dir` that cannot be served is refused, and the demo API, which used to be
/// started before the directory was looked at, is not left listening with nothing to stop it
/// (its task detached when `start` returned the error).
#[tokio::test]
async fn a_refused_static_dir_leaves_no_demo_api_listening() {
    let before = listening_sockets();
    let missing = std::env::temp_dir().join(format!(
        "countersign-no-such-dir-{}-{}",
        std::process::id(),
        line!()
    ));
    let error = dev::start(DevOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        static_dir: Some(missing),
        ..DevOptions::default()
    })
    .await
    .expect_err("a missing --static-dir is refused");
    assert!(error.to_string().contains("--static-dir"), "{error}");
    // Anything spawned has had its chance to run (and a leaked listener to stay).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        listening_sockets(),
        before,
        "a listener is left open after the refused start"
    );
}

//! Replays the fuzz targets' committed inputs without a fuzzer: every file of
//! fuzz/corpus/<target>/ (seeds and what fuzzing added to them) and of
//! fuzz/regressions/<target>/ (inputs that once found a defect) goes through the same check
//! function the fuzz target runs (fuzz/src/checks.rs), so CI guards the findings cheaply.
//! Fuzzing itself: scripts/fuzz.sh (docs/ARCHITECTURE.md, "Fuzzing").
#![cfg(feature = "proxy")]

#[path = "../fuzz/src/checks.rs"]
#[allow(dead_code)]
mod checks;
#[path = "support_redis/mod.rs"]
mod support_redis;

use std::path::{Path, PathBuf};

/// The inputs committed for `target`, with their paths (for the failure message).
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut found = Vec::new();
    for dir in ["corpus", "regressions"] {
        let dir = root.join(dir).join(target);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("read corpus dir").path();
            if path.is_file() {
                let data = std::fs::read(&path).expect("read corpus file");
                found.push((path, data));
            }
        }
    }
    found.sort();
    found
}

/// Runs `check` on every input of `target`; fails naming each input that panicked.
fn replay(target: &str, check: impl Fn(&[u8])) {
    let inputs = inputs(target);
    assert!(
        !inputs.is_empty(),
        "no committed inputs for fuzz target {target} (fuzz/corpus/{target}/)"
    );
    let mut failed = Vec::new();
    for (path, data) in &inputs {
        // A panic is a finding: caught so that every failing input is named, not only the first.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} inputs of fuzz target {target} fail: {failed:#?}",
        failed.len(),
        inputs.len()
    );
}

#[test]
fn verify_corpus() {
    replay("verify", checks::verify);
}

#[test]
fn sf_fields_corpus() {
    replay("sf_fields", checks::sf_fields);
}

#[test]
fn identity_corpus() {
    replay("identity", checks::identity);
}

#[test]
fn rawhttp_corpus() {
    replay("rawhttp", checks::rawhttp);
}

#[test]
fn keyfile_corpus() {
    replay("keyfile", checks::keyfile);
}

#[test]
fn proxy_config_corpus() {
    replay("proxy_config", checks::proxy_config);
}

#[test]
fn proxy_headers_corpus() {
    replay("proxy_headers", checks::proxy_headers);
}

#[test]
fn session_record_corpus() {
    let server = support_redis::RedisServer::start();
    let rig = checks::SessionRecordRig::new(&server.url());
    // A record as a real login writes it is among the inputs, whatever the corpus holds.
    let real = rig.real_record(&countersign::Identity::new("alice", ["admin"]));
    let mut seeded = vec![1u8];
    seeded.extend_from_slice(&real);
    rig.check(&seeded);
    replay("session_record", |data| rig.check(data));
}

#[test]
fn proxy_protocol_corpus() {
    replay("proxy_protocol", checks::proxy_protocol);
}

#[test]
fn ws_frames_corpus() {
    replay("ws_frames", checks::ws_frames);
}

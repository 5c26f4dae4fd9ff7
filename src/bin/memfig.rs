//! `countersign-memfig`: resident memory of the in-memory stores at scale, for docs/BENCHMARKS.md.
//!
//! Fills a `MemoryReplayCache` with N live nonces, then (keeping it alive, so freed memory cannot
//! be reused and hide the second figure) a `MemorySessionStore` with M live sessions, and reports
//! the growth of VmRSS (`/proc/self/status`) caused by each. Prints one JSON line.
//!
//! ```text
//! countersign-memfig                      # 1,000,000 replay entries and 1,000,000 sessions
//! countersign-memfig --replay 10000 --sessions 10000     # the smoke run
//! countersign-memfig --replay 0 --snapshot /tmp/s.snapshot # + the session snapshot's size,
//!                                                          # its write and restore times and
//!                                                          # the restore's memory
//! ```
//!
//! Targets (issue 5), for 1,000,000 entries each: replay cache <= 150 MiB, sessions <= 300 MiB.
//! With `--check`, exit 1 when a figure for 1,000,000 or more entries misses its target.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use countersign::core::{Identity, Nonce};
use countersign::proxy::session::{MemorySessionStore, SessionStore as _, SessionTimeouts};
use countersign::replay::{MemoryReplayCache, ReplayOutcome};

/// The targets of issue 5, in MiB per 1,000,000 entries.
const REPLAY_TARGET_MIB: f64 = 150.0;
const SESSIONS_TARGET_MIB: f64 = 300.0;
const TARGET_SCALE: usize = 1_000_000;

#[derive(Debug, Parser)]
#[command(
    name = "countersign-memfig",
    about = "RSS growth of 1M replay-cache entries and 1M in-memory sessions"
)]
struct Args {
    /// Replay-cache entries to insert (live nonces of 22 base64url characters).
    #[arg(long, default_value_t = 1_000_000)]
    replay: usize,
    /// Sessions to create.
    #[arg(long, default_value_t = 1_000_000)]
    sessions: usize,
    /// Distinct users the sessions belong to (default: one user per session, the worst case
    /// for the per-user index).
    #[arg(long)]
    users: Option<usize>,
    /// Exit 1 when a figure measured at full scale (1,000,000 entries or more) misses its
    /// target.
    #[arg(long)]
    check: bool,
    /// Also write the sessions to this file as `session.snapshot_file` does at a stop, and
    /// restore them into a fresh store as the next start does: the file's size and both
    /// times (the file is removed by the restore).
    #[arg(long, value_name = "FILE")]
    snapshot: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            println!("{}", report.json);
            if args.check && !report.within_targets {
                eprintln!("countersign-memfig: a memory target was missed");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("countersign-memfig: {e}");
            ExitCode::from(2)
        }
    }
}

struct Report {
    json: serde_json::Value,
    within_targets: bool,
}

/// A field of /proc/self/status in KiB (VmRSS, VmHWM).
fn proc_status_kib(field: &str) -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().strip_suffix("kB")?.trim().parse().ok()
        })
        .ok_or_else(|| format!("/proc/self/status has no {field} line"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One figure: growth of RSS, per-entry bytes, and the target scaled to the entries inserted.
fn figure(entries: usize, before_kib: u64, after_kib: u64, target_mib: f64) -> serde_json::Value {
    let growth = after_kib.saturating_sub(before_kib);
    let full_scale = entries >= TARGET_SCALE;
    serde_json::json!({
        "entries": entries,
        "rss_before_mib": mib(before_kib),
        "rss_after_mib": mib(after_kib),
        "rss_growth_mib": mib(growth),
        "bytes_per_entry": if entries > 0 { (growth * 1024) as f64 / entries as f64 } else { 0.0 },
        "target_mib_per_million": target_mib,
        // Only a full-scale run can be held to the target: small runs are dominated by
        // allocator granularity.
        "within_target": if full_scale { Some(mib(growth) * TARGET_SCALE as f64 / entries as f64 <= target_mib) } else { None },
    })
}

fn run(args: &Args) -> Result<Report, String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| format!("clock: {e}"))?
        .as_secs();
    let baseline = proc_status_kib("VmRSS")?;

    // --- replay cache: every entry live for the default window plus skew (12 s) ---
    // Measured before construction, so whatever `new` preallocates counts too.
    let before = proc_status_kib("VmRSS")?;
    let replay = MemoryReplayCache::new(args.replay.max(1));
    let started = Instant::now();
    for _ in 0..args.replay {
        let nonce = Nonce::random();
        match replay.check_and_record_now(nonce.as_str(), now + 12, now) {
            Ok(ReplayOutcome::Fresh) => {}
            Ok(ReplayOutcome::Replayed) => {
                return Err("a random nonce was reported replayed".into())
            }
            Err(e) => return Err(format!("replay cache refused an entry: {e}")),
        }
    }
    let replay_secs = started.elapsed().as_secs_f64();
    let after = proc_status_kib("VmRSS")?;
    if replay.len() != args.replay {
        return Err(format!(
            "replay cache holds {} entries, expected {}",
            replay.len(),
            args.replay
        ));
    }
    let mut replay_figure = figure(args.replay, before, after, REPLAY_TARGET_MIB);
    replay_figure["insert_seconds"] = replay_secs.into();

    // --- sessions (the replay cache stays alive: its memory cannot be reused here) ---
    let timeouts = SessionTimeouts {
        idle: Duration::from_secs(30 * 60),
        absolute: Duration::from_secs(12 * 3600),
    };
    let users = args.users.unwrap_or(args.sessions).max(1);
    let before = proc_status_kib("VmRSS")?;
    let store = MemorySessionStore::new(timeouts, args.sessions.max(1));
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async {
        for i in 0..args.sessions {
            let identity = Identity::new(format!("user-{:07}", i % users), ["user"]);
            store
                .create(&identity, now)
                .await
                .map_err(|e| format!("session store refused a session: {e}"))?;
        }
        Ok::<(), String>(())
    })?;
    let sessions_secs = started.elapsed().as_secs_f64();
    let after = proc_status_kib("VmRSS")?;
    let held = runtime
        .block_on(store.count())
        .map_err(|e| format!("session count: {e}"))?;
    if held != args.sessions {
        return Err(format!(
            "session store holds {held} sessions, expected {}",
            args.sessions
        ));
    }
    let mut sessions_figure = figure(args.sessions, before, after, SESSIONS_TARGET_MIB);
    sessions_figure["insert_seconds"] = sessions_secs.into();
    sessions_figure["distinct_users"] = users.into();

    if let Some(path) = &args.snapshot {
        sessions_figure["snapshot"] = snapshot_figure(&store, path, now, args.sessions)?;
    }

    let within_targets = [&replay_figure, &sessions_figure]
        .iter()
        .all(|f| f["within_target"].as_bool() != Some(false));
    let json = serde_json::json!({
        "rss_baseline_mib": mib(baseline),
        "rss_peak_mib": mib(proc_status_kib("VmHWM")?),
        "replay_cache": replay_figure,
        "sessions": sessions_figure,
    });
    // Keep both stores alive until every figure is taken.
    drop(store);
    drop(replay);
    Ok(Report {
        json,
        within_targets,
    })
}

/// `session.snapshot_file` at this scale: the save at a stop and the restore at a start.
fn snapshot_figure(
    store: &MemorySessionStore,
    path: &std::path::Path,
    now: u64,
    sessions: usize,
) -> Result<serde_json::Value, String> {
    use countersign::core::{Keyring, Secret};
    use countersign::proxy::session_snapshot;
    let secret = Secret::new(vec![7; 32]).map_err(|e| e.to_string())?;
    let keyring = Keyring::single("k1", secret).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let saved =
        session_snapshot::save(store, path, &keyring, None, now).map_err(|e| e.to_string())?;
    let save_secs = started.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let fresh = MemorySessionStore::new(store.timeouts(), sessions.max(1));
    // The restore's peak, apart from the process's earlier ones: Linux resets VmHWM to the
    // current RSS on a write of "5" to clear_refs.
    std::fs::write("/proc/self/clear_refs", "5")
        .map_err(|e| format!("cannot reset the peak RSS (/proc/self/clear_refs): {e}"))?;
    let rss_before = proc_status_kib("VmRSS")?;
    let started = Instant::now();
    let restored = session_snapshot::restore(&fresh, path, &keyring, None, now, sessions.max(1))
        .map_err(|e| e.to_string())?
        .ok_or("the snapshot was not found")?;
    let restore_secs = started.elapsed().as_secs_f64();
    let rss_peak = proc_status_kib("VmHWM")?;
    let rss_after = proc_status_kib("VmRSS")?;
    if saved.sessions != sessions || restored.restored != sessions {
        return Err(format!(
            "snapshot: wrote {}, restored {} of {sessions} sessions",
            saved.sessions, restored.restored
        ));
    }
    Ok(serde_json::json!({
        "bytes": bytes,
        "bytes_per_session": bytes as f64 / sessions.max(1) as f64,
        "save_seconds": save_secs,
        "restore_seconds": restore_secs,
        // What the restored store holds once the restore is done, and the most the process
        // held above its start while restoring: the difference is the restore's own memory.
        "restore_rss_growth_mib": mib(rss_after.saturating_sub(rss_before)),
        "restore_rss_peak_growth_mib": mib(rss_peak.saturating_sub(rss_before)),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_rss() {
        let rss = proc_status_kib("VmRSS").unwrap();
        assert!(rss > 0);
        assert!(proc_status_kib("NoSuchField").is_err());
    }

    #[test]
    fn full_scale_figures_are_held_to_the_target() {
        let over = figure(1_000_000, 0, 200 * 1024, 150.0);
        assert_eq!(over["within_target"], serde_json::json!(false));
        let under = figure(1_000_000, 0, 100 * 1024, 150.0);
        assert_eq!(under["within_target"], serde_json::json!(true));
        let small = figure(1_000, 0, 200 * 1024, 150.0);
        assert!(small["within_target"].is_null());
        assert_eq!(under["bytes_per_entry"], serde_json::json!(104.8576));
    }
}

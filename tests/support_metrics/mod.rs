//! The independent checkers of a `/metrics` scrape: the official Python client's parser (with
//! the format's structural rules, `interop/check_metrics.py`) and `promtool check metrics`,
//! installed by `interop/observability-tools.sh` on first use. A test that needs them fails
//! when they cannot be installed, never skips. Include after `mod support;` (its
//! [`temp_dir`](crate::support::temp_dir)).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::support::temp_dir;

/// Runs `interop/observability-tools.sh` once per test process (python3 with a venv holding
/// prometheus-client, and promtool beside its python; each installed when missing) and returns
/// the venv's python. Panics when they cannot be installed: the check fails rather than skips.
pub fn checker_python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("observability-venv");
        let output = Command::new("bash")
            .arg(root.join("interop/observability-tools.sh"))
            .arg(&venv)
            .output()
            .expect("run bash interop/observability-tools.sh");
        assert!(
            output.status.success(),
            "interop/observability-tools.sh could not install the metrics checkers:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        venv.join("bin/python")
    })
}

/// `interop/check_metrics.py` (prometheus_client's parser plus the format's structural rules)
/// and `promtool check metrics` on each scrape; panics with their complaint.
pub fn check_with_independent_parsers(
    scrapes: &[(&str, &str)],
    routes: &[&str],
    max_series: usize,
) {
    let python = checker_python();
    let dir = temp_dir("metrics-scrapes");
    let mut files = Vec::new();
    for (name, text) in scrapes {
        let file = dir.join(format!("{name}.txt"));
        std::fs::write(&file, text).unwrap();
        let promtool = Command::new(python.with_file_name("promtool"))
            .args(["check", "metrics"])
            .stdin(std::fs::File::open(&file).unwrap())
            .output()
            .expect("run promtool");
        assert!(
            promtool.status.success(),
            "promtool check metrics refused the {name} scrape:\n{}{}\n{text}",
            String::from_utf8_lossy(&promtool.stdout),
            String::from_utf8_lossy(&promtool.stderr)
        );
        files.push(file);
    }
    let mut command = Command::new(python);
    command.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/check_metrics.py"));
    for route in routes {
        command.arg("--route").arg(route);
    }
    command.arg("--series").arg(max_series.to_string());
    let output = command.args(&files).output().expect("run check_metrics.py");
    assert!(
        output.status.success(),
        "check_metrics.py refused a scrape:\n{}{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        scrapes
            .iter()
            .map(|(name, text)| format!("--- {name}\n{text}"))
            .collect::<String>()
    );
}

//! What a library user's build pulls in: `countersign = { default-features = false, features =
//! [...] }` (README, "API developers") must not bring the proxy's dependencies along. Reads
//! `cargo tree` over the lockfile (offline, ~0.1 s per feature set; nothing is built).
//!
//! Run: `cargo test --all-features --test library_dependencies`

use std::collections::BTreeSet;
use std::process::Command;

/// Only the proxy needs these (and `tokio`/`hyper`, which the layers do without: they run
/// under any executor).
const PROXY_ONLY: &[&str] = &[
    "argon2",
    "clap",
    "cookie",
    "hyper",
    "hyper-rustls",
    "hyper-util",
    "mime_guess",
    "redis",
    "rustix",
    "rustls",
    "serde_json",
    "tikv-jemallocator",
    "tokio",
    "tokio-rustls",
    "tokio-tungstenite",
    "toml",
    "tracing-subscriber",
];

/// The normal (non-dev, non-build) dependencies, by crate name, of the library with only
/// `features`.
fn dependencies(features: &str) -> BTreeSet<String> {
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let mut command = Command::new(cargo);
    command.args([
        "tree",
        "--offline",
        "--manifest-path",
        manifest,
        "--no-default-features",
        "--edges",
        "normal",
        "--prefix",
        "none",
        "--format",
        "{p}",
    ]);
    if !features.is_empty() {
        command.args(["--features", features]);
    }
    let output = command.output().expect("cargo tree runs");
    assert!(
        output.status.success(),
        "cargo tree --features {features:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_verify_only_build_pulls_no_proxy_dependency() {
    for (features, allowed) in [
        ("", &[][..]),
        ("axum", &[][..]),
        // The keyring file reader parses TOML.
        ("keyfile", &["toml"][..]),
        ("axum,keyfile", &["toml"][..]),
        // `NamedService` only; tonic's own `tokio-stream` brings tokio (a tonic server runs
        // on it anyway), but no hyper, no transport.
        ("tonic", &["tokio"][..]),
        // The Redis replay cache: its client and the runtime it needs.
        ("redis", &["redis", "tokio", "rustls", "tokio-rustls"][..]),
    ] {
        let pulled = dependencies(features);
        assert!(pulled.contains("countersign"), "{pulled:?}");
        let unwanted: Vec<&str> = PROXY_ONLY
            .iter()
            .copied()
            .filter(|name| pulled.contains(*name) && !allowed.contains(name))
            .collect();
        assert!(
            unwanted.is_empty(),
            "--no-default-features --features {features:?} pulls in {unwanted:?}"
        );
    }
    // The framework crates come only with their feature: axum (for `OriginalUri`, without
    // its server) with `axum`, tonic with `tonic`.
    let bare = dependencies("");
    for name in ["axum", "axum-core", "tonic"] {
        assert!(
            !bare.contains(name),
            "--no-default-features pulls in {name}"
        );
    }
    let axum = dependencies("axum");
    assert!(axum.contains("axum") && !axum.contains("tonic"), "{axum:?}");
    let tonic = dependencies("tonic");
    assert!(
        tonic.contains("tonic") && !tonic.contains("axum"),
        "{tonic:?}"
    );
    // The check sees what it looks for: the proxy build has them.
    let proxy = dependencies("proxy");
    for name in ["clap", "argon2", "cookie", "tokio", "hyper"] {
        assert!(proxy.contains(name), "{name} not in the proxy's tree");
    }
}

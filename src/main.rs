//! The `countersign` binary: key tools, `sign`/`verify` for scripts and interop checks, and the
//! proxy (`run`, `dev`, `demo-api`, `check-config`, `hash-password`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

// jemalloc instead of glibc malloc: the proxy makes many small short-lived allocations per
// request on one runtime thread per core, and jemalloc's thread caches cut its CPU per
// request (measured in docs/BENCHMARKS.md).
#[global_allocator]
static GLOBAL_ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "countersign",
    version,
    about = "RFC 9421 HMAC request signing and a BFF proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a keyring with one fresh key (a 32-byte random secret); to add the key to a
    /// keyring, append only its [[keys]] table.
    Keygen(cli::signing::KeygenArgs),
    /// Sign one raw HTTP/1.1 request (file or stdin) and write it to stdout.
    Sign(cli::signing::SignArgs),
    /// Verify one raw HTTP/1.1 request; print one line of JSON.
    Verify(cli::signing::VerifyArgs),
    /// Run the proxy with a config file.
    Run(cli::proxy::RunArgs),
    /// Check a config file (and the files it names); with --online also the servers it names;
    /// exit 0, 1 (--online: a required server cannot be used) or 2 (the config).
    CheckConfig(cli::proxy::CheckConfigArgs),
    /// Self-contained demo: proxy, demo API behind the real VerifyLayer, demo page.
    Dev(cli::proxy::DevArgs),
    /// The demo API alone (whoami, echo, notes) behind the real VerifyLayer.
    DemoApi(cli::proxy::DemoApiArgs),
    /// Read a password from stdin and print its argon2id PHC hash.
    HashPassword(cli::proxy::HashPasswordArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Keygen(args) => cli::signing::keygen(args),
        Command::Sign(args) => cli::signing::sign(args),
        Command::Verify(args) => cli::signing::verify(args),
        Command::Run(args) => cli::proxy::run(args),
        Command::CheckConfig(args) => cli::proxy::check_config(args),
        Command::Dev(args) => cli::proxy::dev(args),
        Command::DemoApi(args) => cli::proxy::demo_api(args),
        Command::HashPassword(args) => cli::proxy::hash_password(args),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::Cli;

    /// `Cli` derives `Debug`; the secrets its arguments may hold (the `dev` user's password, a
    /// Redis URL's `:password@`, the sentinels' password) never show in it.
    #[test]
    fn debug_of_the_arguments_never_shows_a_secret() {
        for args in [
            &["countersign", "dev", "--password", "hunter2"][..],
            &[
                "countersign",
                "verify",
                "--keyring",
                "k.toml",
                "--replay-redis",
                "redis://:hunter2@h",
            ],
            &[
                "countersign",
                "demo-api",
                "--listen",
                "127.0.0.1:0",
                "--keyring",
                "k.toml",
                "--replay-redis",
                "redis://:hunter2@h",
            ],
            &[
                "countersign",
                "verify",
                "--keyring",
                "k.toml",
                "--replay-redis",
                "redis://:hunter2@/0",
                "--replay-redis-sentinel",
                "h:26379",
                "--replay-redis-sentinel-master",
                "m",
                "--replay-redis-sentinel-password",
                "hunter2",
            ],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            let shown = format!("{cli:?}");
            assert!(!shown.contains("hunter2"), "{args:?}: {shown}");
            assert!(shown.contains("[redacted]"), "{args:?}: {shown}");
            let pretty = format!("{cli:#?}");
            assert!(!pretty.contains("hunter2"), "{args:?}: {pretty}");
        }
    }
}

//! `run`, `check-config`, `dev`, `hash-password`. (Stub: being implemented.)
use std::process::ExitCode;

/// `run` arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {}
/// `check-config` arguments.
#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {}
/// `dev` arguments.
#[derive(Debug, clap::Args)]
pub struct DevArgs {}
/// `hash-password` arguments.
#[derive(Debug, clap::Args)]
pub struct HashPasswordArgs {}

pub fn run(_args: RunArgs) -> ExitCode {
    ExitCode::from(2)
}
pub fn check_config(_args: CheckConfigArgs) -> ExitCode {
    ExitCode::from(2)
}
pub fn dev(_args: DevArgs) -> ExitCode {
    ExitCode::from(2)
}
pub fn hash_password(_args: HashPasswordArgs) -> ExitCode {
    ExitCode::from(2)
}

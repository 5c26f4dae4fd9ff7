//! `keygen`, `sign`, `verify`. (Stub: being implemented.)
use std::process::ExitCode;

/// `keygen` arguments.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Key id.
    #[arg(long, default_value = "k1")]
    pub id: String,
}

/// `sign` arguments.
#[derive(Debug, clap::Args)]
pub struct SignArgs {}

/// `verify` arguments.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {}

pub fn keygen(_args: KeygenArgs) -> ExitCode {
    ExitCode::from(2)
}
pub fn sign(_args: SignArgs) -> ExitCode {
    ExitCode::from(2)
}
pub fn verify(_args: VerifyArgs) -> ExitCode {
    ExitCode::from(2)
}

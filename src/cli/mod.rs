//! Subcommand implementations. Each returns the process exit code: 0 success, 1 a negative
//! answer (`verify` of an invalid request), 2 a usage, config or I/O error.

pub mod password;
pub mod proxy;
pub mod rawhttp;
pub mod signing;

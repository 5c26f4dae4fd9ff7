//! Subcommand implementations. Each returns the process exit code: 0 success, 1 a negative
//! answer (`verify` of a request it read and found invalid), 2 a usage, config or I/O error, or
//! input that cannot be read as an HTTP/1.1 request.

pub mod password;
pub mod proxy;
pub mod rawhttp;
pub mod signing;

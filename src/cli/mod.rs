//! Subcommand implementations. Each returns the process exit code: 0 success, 1 a negative
//! answer (`verify` of a request it read and found invalid), 2 a usage, config or I/O error, or
//! input that cannot be read as an HTTP/1.1 request.

pub mod password;
pub mod proxy;
pub mod rawhttp;
pub mod signing;

/// Writes one line to stderr, ignoring a failure: `eprintln!` panics (exit 101) when stderr
/// cannot be written (`2>/dev/full`, a closed pipe), and the exit code must still say 2.
pub(crate) fn stderr_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

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

/// `--window` and `--skew` of `sign`, `verify` and `demo-api`: whole seconds, as a bare number
/// (`10`) or a duration as `proxy.toml` writes `signing.window` (`"10s"`, `"1m"`). Each
/// command took one form only, and a value copied from the config got "invalid digit found in
/// string" (or `demo-api --window 10` "invalid duration").
pub(crate) fn parse_seconds_arg(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if !trimmed.is_empty() && trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return trimmed
            .parse::<u64>()
            .map_err(|_| format!("{text:?} is too large"));
    }
    match countersign::keyfile::parse_duration(trimmed) {
        Ok(Some(d)) if d.subsec_nanos() == 0 => Ok(d.as_secs()),
        Ok(Some(_)) => Err(format!(
            "{text:?}: must be a whole number of seconds (signature times are unix seconds)"
        )),
        Ok(None) | Err(_) => Err(format!(
            "invalid value {text:?} (seconds, e.g. \"10\", or a duration, e.g. \"10s\" or \"1m\")"
        )),
    }
}

/// [`parse_seconds_arg`], at least one second.
pub(crate) fn parse_positive_seconds_arg(text: &str) -> Result<u64, String> {
    match parse_seconds_arg(text)? {
        0 => Err(format!(
            "{text:?}: must be greater than zero (at least 1 second)"
        )),
        n => Ok(n),
    }
}

//! Review of `sign` and `verify` on input that cannot be read as an HTTP/1.1 request: a header
//! block with more distinct field names than `http`'s `HeaderMap` holds panicked (exit 101), and
//! a request target that is not a URI answered `{"valid":false,...}` (exit 1) where every other
//! unreadable request exits 2. Each test failed before its fix.
//! Run: `cargo test --all-features --test cli_review`.
#![cfg(feature = "proxy")]

mod support_cli;
mod support_tmp;

use support_cli::{run, Run};
use support_tmp::TestDir;

/// 32 bytes 0x00..0x1f, base64.
const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const CREATED: &str = "1700000000";
const NONCE: &str = "c2lnbmF0dXJlLW5vbmNlLTAx";

/// A keyring with the one key `k1`, in `dir`.
fn keyring(dir: &TestDir) -> String {
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET}\"\n"),
    )
    .unwrap();
    path.display().to_string()
}

fn sign(keys: &str, request: &[u8], extra: &[&str]) -> Run {
    let mut args = vec![
        "sign",
        "--keyring",
        keys,
        "--created",
        CREATED,
        "--nonce",
        NONCE,
    ];
    args.extend_from_slice(extra);
    run(&args, request)
}

fn verify(keys: &str, request: &[u8], extra: &[&str]) -> Run {
    let mut args = vec!["verify", "--keyring", keys, "--now", CREATED];
    args.extend_from_slice(extra);
    run(&args, request)
}

/// Exit 2, nothing on stdout, and one message on stderr naming the command, the source and
/// `problem`.
#[track_caller]
fn assert_unreadable(out: &Run, command: &str, problem: &str) {
    assert_eq!(out.code, 2, "{command}: {}\n{}", out.stdout, out.stderr);
    assert_eq!(out.stdout, "", "{command}: {}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    assert!(
        out.stderr.starts_with(&format!(
            "countersign {command}: stdin: not an HTTP/1.1 request: "
        )),
        "{command}: {}",
        out.stderr
    );
    assert!(out.stderr.contains(problem), "{command}: {}", out.stderr);
}

/// `http`'s `HeaderMap` panics ("size overflows MAX_SIZE") at its 24,577th distinct name, and
/// `--max-headers 65536` with a large `--max-header-bytes` let such a header block through to
/// it: exit 101 and a backtrace. Now both commands refuse it as unreadable input (exit 2).
#[test]
fn more_distinct_header_names_than_http_holds_exit_2_not_a_panic() {
    let dir = TestDir::new("cli-review");
    let keys = keyring(&dir);
    let mut request = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
    for i in 0..25_000 {
        request.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    let limits = ["--max-headers", "65536", "--max-header-bytes", "1048576"];
    assert_unreadable(
        &verify(&keys, &request, &limits),
        "verify",
        "distinct header field names",
    );
    assert_unreadable(
        &sign(&keys, &request, &limits),
        "sign",
        "distinct header field names",
    );
}

/// A request target that is not a URI (raw UTF-8, a backquote, a fragment) was answered
/// `{"valid":false,"reason":"malformed_signature"}` exit 1 by `verify` and exit 2 by `sign`,
/// while a header line the parser refuses exits 2 for both. Now every request that cannot be
/// read exits 2 with a message naming the problem, for `sign` and `verify` alike.
#[test]
fn a_target_that_is_not_a_uri_is_unreadable_for_sign_and_verify() {
    let dir = TestDir::new("cli-review");
    let keys = keyring(&dir);
    for (target, problem) in [
        ("/caf\u{e9}", "invalid request target"),
        ("/a`b", "invalid request target"),
        ("/x#f", "has a fragment"),
        ("/x?a=1#", "has a fragment"),
        ("http://h/x#f", "has a fragment"),
    ] {
        let request = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_unreadable(&verify(&keys, request.as_bytes(), &[]), "verify", problem);
        assert_unreadable(&sign(&keys, request.as_bytes(), &[]), "sign", problem);
    }
    // The raw parser's refusals, for comparison: the same answer.
    let spaced = b"GET / HTTP/1.1\r\nHost : h\r\n\r\n";
    assert_unreadable(&verify(&keys, spaced, &[]), "verify", "line 2");
    assert_unreadable(&sign(&keys, spaced, &[]), "sign", "line 2");

    // A signed request whose target gained a fragment on the way cannot be read either.
    let signed = sign(&keys, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n", &[]);
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    assert_eq!(verify(&keys, signed.stdout.as_bytes(), &[]).code, 0);
    let moved = signed.stdout.replacen("GET /x ", "GET /x#f ", 1);
    assert_unreadable(
        &verify(&keys, moved.as_bytes(), &[]),
        "verify",
        "has a fragment",
    );
}

/// Unchanged (a guard, not a fix): a request that was read and then fails verification still
/// answers one line of JSON and exit 1, a Content-Length over `--max-body-bytes` included.
#[test]
fn read_requests_that_fail_verification_still_exit_1() {
    let dir = TestDir::new("cli-review");
    let keys = keyring(&dir);
    let signed = sign(&keys, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", &[]);
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let doubled = signed.stdout.replacen(
        "Host: a.example\r\n",
        "Host: a.example\r\nHost: b.example\r\n",
        1,
    );
    let out = verify(&keys, doubled.as_bytes(), &[]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "{\"valid\":false,\"reason\":\"malformed_signature\"}\n"
    );
    let big = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello";
    let signed_big = sign(&keys, big, &[]);
    assert_eq!(signed_big.code, 0, "{}", signed_big.stderr);
    let out = verify(
        &keys,
        signed_big.stdout.as_bytes(),
        &["--max-body-bytes", "4"],
    );
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "{\"valid\":false,\"reason\":\"body_too_large\"}\n"
    );
    // Unsigned, it is that first (headers and MAC before the body, as at the VerifyLayer).
    let out = verify(&keys, big, &["--max-body-bytes", "4"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "{\"valid\":false,\"reason\":\"missing_signature\"}\n"
    );
}

//! QA of the debugging commands (`hash-password`, `sign`, `verify`) as an operator uses them at
//! night: an unwritable stdout, a hand-written request file with an editor's extra newline or a
//! mistyped line, an expired signature. Each test failed before its fix; tests/cli_signing.rs
//! holds the documented contract itself.
//! Run: `cargo test --all-features --test cli_qa`.
#![cfg(feature = "proxy")]

mod support_cli;
mod support_tmp;

use std::io::Write as _;
use std::process::{Command, Stdio};

use support_cli::{run, Run, BIN};
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

/// `sign` with a fixed `created` and nonce, so that two runs give the same bytes.
fn sign(keys: &str, request: &[u8]) -> Run {
    run(
        &[
            "sign",
            "--keyring",
            keys,
            "--created",
            CREATED,
            "--nonce",
            NONCE,
        ],
        request,
    )
}

fn verify(keys: &str, request: &[u8], now: &str) -> Run {
    run(&["verify", "--keyring", keys, "--now", now], request)
}

/// `println!` panics when stdout cannot be written: `hash-password > file` on a full disk
/// ended with exit 101 and a backtrace. Now it is exit 2 and a message naming the command and
/// the problem, as `keygen`, `sign` and `verify` answer.
#[test]
fn hash_password_reports_an_unwritable_stdout() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut child = Command::new(BIN)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(full)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"pass word\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("countersign hash-password: cannot write to stdout: No space left"),
        "{stderr}"
    );
    assert!(!stderr.contains("pass word"), "{stderr}");
}

/// A request file without `Content-Length` ends its body at EOF. A lone line break there (an
/// editor's final newline, one empty line too many) is not a body: `sign` made a `GET` with
/// `Content-Length: 2` and the digest of `\r\n`, which the real request (no body) then failed
/// as `digest_mismatch`; and a saved signed `GET` with that newline failed `verify` the same
/// way. A body of more than a line break is still the body.
#[test]
fn a_lone_line_break_after_the_header_block_is_not_a_body() {
    let dir = TestDir::new("cli-qa");
    let keys = keyring(&dir);
    let get = b"GET /orders HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
    let plain = sign(&keys, get);
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    assert!(!plain.stdout.contains("Content-Length"), "{}", plain.stdout);
    for tail in ["\n", "\r\n"] {
        let input = [&get[..], tail.as_bytes()].concat();
        let signed = sign(&keys, &input);
        assert_eq!(signed.code, 0, "{tail:?}: {}", signed.stderr);
        assert_eq!(signed.stdout, plain.stdout, "{tail:?}");
        let lf_only = String::from_utf8(input.clone())
            .unwrap()
            .replace("\r\n", "\n");
        assert_eq!(sign(&keys, lf_only.as_bytes()).stdout, plain.stdout);

        let saved = format!("{}{tail}", plain.stdout);
        let out = verify(&keys, saved.as_bytes(), CREATED);
        assert_eq!(out.code, 0, "{tail:?}: {} {}", out.stdout, out.stderr);
        assert_eq!(
            out.stdout,
            "{\"valid\":true,\"user\":null,\"roles\":[],\"keyid\":\"k1\"}\n"
        );
    }
    // More than a lone line break is a body read to EOF, line break included.
    let post = sign(&keys, b"POST /n HTTP/1.1\r\nHost: h\r\n\r\nx\n");
    assert_eq!(post.code, 0, "{}", post.stderr);
    assert!(
        post.stdout.contains("Content-Length: 2\r\n"),
        "{}",
        post.stdout
    );
    assert!(post.stdout.ends_with("\r\n\r\nx\n"), "{}", post.stdout);
    let two = sign(&keys, b"POST /n HTTP/1.1\r\nHost: h\r\n\r\n\n\n");
    assert!(
        two.stdout.contains("Content-Length: 2\r\n"),
        "{}",
        two.stdout
    );
}

/// A hand-written request that httparse refuses was answered "invalid header name", "invalid
/// header value" or "bad HTTP version" (for a space in the target), naming no line. Now the
/// message names the line and what is wrong with it, for `sign` and `verify` alike (exit 2),
/// and never quotes a header value.
#[test]
fn unparsable_lines_are_named_with_their_problem() {
    let dir = TestDir::new("cli-qa");
    let keys = keyring(&dir);
    let cases: [(&[u8], &[&str]); 11] = [
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization Basic s3cr:et\r\n\r\n",
            &["line 3", "whitespace inside a header name"],
        ),
        (
            b"GET / HTTP/1.1\r\nHost : api.example.com\r\n\r\n",
            &[
                "line 2",
                "whitespace between the header name \"Host\" and its `:`",
            ],
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Note: a\r\n  folded\r\n\r\n",
            &["line 4", "starting with whitespace", "one line"],
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nNoColonHere\r\n\r\n",
            &["line 3", "without `:`"],
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nX{Bad}: 1\r\n\r\n",
            &["line 3", "invalid header name \"X{Bad}\""],
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer s3cr\x01et\r\n\r\n",
            &[
                "line 3",
                "\"Authorization\"",
                "control character (byte 0x01)",
            ],
        ),
        (
            b"GET / HTTP/1.1\r\nHost: h\rX-Other: 1\r\n\r\n",
            &["line 2", "carriage return that does not end the line"],
        ),
        (
            b"GET /orders/my order HTTP/1.1\r\nHost: h\r\n\r\n",
            &["line 1", "more than two spaces", "%20"],
        ),
        (
            b"\xEF\xBB\xBFGET / HTTP/1.1\r\nHost: h\r\n\r\n",
            &["byte order mark"],
        ),
        (b"GET /\r\nHost: h\r\n\r\n", &["line 1", "no HTTP version"]),
        (
            b"\r\nGET / HTTP/1.1\r\nHost: h\r\nHost : h\r\n\r\n",
            &["line 4", "whitespace between the header name"],
        ),
    ];
    for (input, parts) in cases {
        for command in ["sign", "verify"] {
            let out = run(&[command, "--keyring", &keys], input);
            assert_eq!(out.code, 2, "{command} {input:?}: {}", out.stderr);
            assert!(out.stdout.is_empty(), "{command}: {}", out.stdout);
            assert!(
                out.stderr
                    .starts_with(&format!("countersign {command}: stdin: not an HTTP/1.1")),
                "{command}: {}",
                out.stderr
            );
            for part in parts {
                assert!(
                    out.stderr.contains(part),
                    "{command} {input:?}: {:?} should say {part:?}",
                    out.stderr
                );
            }
            assert!(!out.stderr.contains("s3cr"), "{}", out.stderr);
        }
    }
}

/// `sign`'s messages about the request itself (a target the `http` crate refuses, no `Host`)
/// named no input: with several request files in a script, which one? Now they start with the
/// file's path (or `stdin`), as the read errors do.
#[test]
fn sign_errors_about_the_request_name_its_file() {
    let dir = TestDir::new("cli-qa");
    let keys = keyring(&dir);
    for (name, request, problem) in [
        (
            "backquote.http",
            &b"GET /a`b HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            "invalid request target",
        ),
        ("no-host.http", b"GET / HTTP/1.1\r\n\r\n", "Host"),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, request).unwrap();
        let path = path.display().to_string();
        let out = run(&["sign", "--keyring", &keys, &path], b"");
        assert_eq!(out.code, 2, "{}", out.stderr);
        assert!(
            out.stderr
                .starts_with(&format!("countersign sign: {path}: ")),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains(problem), "{}", out.stderr);
        let out = run(&["sign", "--keyring", &keys], request);
        assert!(
            out.stderr.starts_with("countersign sign: stdin: "),
            "{}",
            out.stderr
        );
    }
}

/// `expired` said only "created is older than the window": not which time the request was
/// judged at (the host's clock or `--now`), nor what would have passed. Now the message gives
/// both; the JSON line is unchanged.
#[test]
fn time_verdicts_say_when_and_what_was_accepted() {
    let dir = TestDir::new("cli-qa");
    let keys = keyring(&dir);
    let signed = sign(&keys, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let signed = signed.stdout.as_bytes();

    let out = verify(&keys, signed, "1700000100");
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(out.stdout, "{\"valid\":false,\"reason\":\"expired\"}\n");
    for part in [
        "countersign verify: expired: ",
        "verified at 1700000100, --now",
        "--window 10s, --skew 2s",
        "created must be from 1700000088 to 1700000102",
    ] {
        assert!(out.stderr.contains(part), "{part:?}: {}", out.stderr);
    }

    let out = verify(&keys, signed, "1699999990");
    assert_eq!(
        out.stdout,
        "{\"valid\":false,\"reason\":\"not_yet_valid\"}\n"
    );
    assert!(
        out.stderr
            .contains("created must be from 1699999978 to 1699999992"),
        "{}",
        out.stderr
    );

    // Without --now: the host's clock, and how to choose another time.
    let out = run(&["verify", "--keyring", &keys], signed);
    assert_eq!(out.stdout, "{\"valid\":false,\"reason\":\"expired\"}\n");
    assert!(
        out.stderr
            .contains("this host's clock; --now UNIX to choose"),
        "{}",
        out.stderr
    );
}

/// `keygen` prints a whole one-key keyring (README called it "a keyring entry"). Appended whole
/// to a keyring, its `active` lands inside the previous key's table and the loader said only
/// "keys[0].active: unknown field `active`". Now the message says why and what to append; the
/// `[[keys]]` table alone, appended, is a working second key.
#[test]
fn a_keygen_output_appended_whole_is_explained() {
    let dir = TestDir::new("cli-qa");
    let first = run(&["keygen", "--id", "k1"], b"");
    let second = run(&["keygen", "--id", "k2"], b"");
    assert_eq!((first.code, second.code), (0, 0), "{}", second.stderr);

    let whole = dir.join("whole.toml");
    std::fs::write(&whole, format!("{}{}", first.stdout, second.stdout)).unwrap();
    let whole = whole.display().to_string();
    let out = run(
        &["sign", "--keyring", &whole],
        b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    );
    assert_eq!(out.code, 2, "{}", out.stderr);
    for part in [
        "whole.toml",
        "keys[0].active",
        "must come before the first [[keys]] table",
        "append only its [[keys]] table",
    ] {
        assert!(out.stderr.contains(part), "{part:?}: {}", out.stderr);
    }
    assert!(!out.stderr.contains("secret = "), "{}", out.stderr);

    // What the message asks for: the [[keys]] table alone, appended.
    let table_at = second.stdout.find("\n[[keys]]\n").unwrap();
    let appended = dir.join("appended.toml");
    std::fs::write(
        &appended,
        format!("{}{}", first.stdout, &second.stdout[table_at..]),
    )
    .unwrap();
    let appended = appended.display().to_string();
    let signed = sign(&appended, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let out = verify(&appended, signed.stdout.as_bytes(), CREATED);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

/// `unknown_key` said `keyid "k2"` and nothing more: not which keyring was searched, nor that a
/// rotating key signs as `<id>.<epoch>`. Now both are named.
#[test]
fn unknown_key_names_the_keyring_searched() {
    let dir = TestDir::new("cli-qa");
    let keys = keyring(&dir);
    let other = dir.join("other.toml");
    std::fs::write(
        &other,
        format!("active = \"k2\"\n[[keys]]\nid = \"k2\"\nsecret = \"{SECRET}\"\n"),
    )
    .unwrap();
    let other = other.display().to_string();
    let signed = sign(&other, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let out = verify(&keys, signed.stdout.as_bytes(), CREATED);
    assert_eq!(out.stdout, "{\"valid\":false,\"reason\":\"unknown_key\"}\n");
    assert!(
        out.stderr.contains(&format!(
            "unknown_key: keyid \"k2\" is not a listed, non-retired key of {keys}"
        )),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("<id>.<created / period>"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains(SECRET), "{}", out.stderr);
}

/// `bad_signature` said "MAC mismatch" and nothing else: the one thing needed to debug a
/// mismatch, the signature base the verifier computed, was not shown. Now stderr carries it
/// (request data only, never the secret), to compare line by line with the signer's; stdout
/// keeps its one JSON line.
#[test]
fn bad_signature_shows_the_base_computed() {
    let dir = TestDir::new("cli-qa");
    let keys = keyring(&dir);
    let signed = run(
        &[
            "sign",
            "--keyring",
            &keys,
            "--created",
            CREATED,
            "--nonce",
            NONCE,
            "--user",
            "alice",
        ],
        b"POST /orders?id=1 HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    // A proxy on the way rewrote the Host.
    let moved = signed
        .stdout
        .replacen("Host: api.example.com", "Host: API.example.com:8080", 1);
    let out = verify(&keys, moved.as_bytes(), CREATED);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "{\"valid\":false,\"reason\":\"bad_signature\"}\n"
    );
    let expected = format!(
        "\"@method\": POST\n\"@authority\": api.example.com:8080\n\"@path\": /orders\n\
         \"@query\": ?id=1\n\"content-digest\": sha-256=:RBNvo1WzZ4oRRq0W9+hknpT7T8If536DEMBg9hyq/4o=:\n\
         \"x-auth-user\": alice\n\"@signature-params\": (\"@method\" \"@authority\" \"@path\" \
         \"@query\" \"content-digest\" \"x-auth-user\");created={CREATED};expires=1700000010;\
         nonce=\"{NONCE}\";keyid=\"k1\";alg=\"hmac-sha256\";tag=\"countersign\""
    );
    assert!(out.stderr.contains(&expected), "{}", out.stderr);
    assert!(out
        .stderr
        .starts_with("countersign verify: bad_signature: "));
    assert!(!out.stderr.contains(SECRET), "{}", out.stderr);
}

/// An empty `Host`, or one with a space, was refused as "value of @authority holds non-ASCII,
/// control or newline characters": none of which it held. Now the message says what an
/// authority must be and names the Host header, for `sign` (exit 2) and `verify`
/// (`malformed_signature`) alike.
#[test]
fn a_bad_host_is_named_for_what_it_is() {
    let dir = TestDir::new("cli-qa");
    let keys = keyring(&dir);
    let signed = sign(&keys, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    for host in ["", "api example.com", "h:80:80"] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let out = sign(&keys, request.as_bytes());
        assert_eq!(out.code, 2, "{host:?}: {}", out.stderr);
        for part in ["stdin: ", "the Host header", "is not host[:port]"] {
            assert!(out.stderr.contains(part), "{host:?}: {}", out.stderr);
        }
        assert!(!out.stderr.contains("non-ASCII, control or newline"));

        let moved = signed
            .stdout
            .replacen("Host: h\r\n", &format!("Host: {host}\r\n"), 1);
        let out = verify(&keys, moved.as_bytes(), CREATED);
        assert_eq!(
            out.stdout, "{\"valid\":false,\"reason\":\"malformed_signature\"}\n",
            "{host:?}"
        );
        assert!(out.stderr.contains("is not host[:port]"), "{}", out.stderr);
    }
}

/// A request copied from the proxy's traffic carries `X-Auth-User`; signed without `--user`,
/// the field was dropped without a word and the API saw an anonymous request. The output is
/// still the anonymous request (exit 0), and stderr now says what was removed and why.
#[test]
fn sign_says_when_it_drops_the_inputs_identity() {
    let dir = TestDir::new("cli-qa");
    let keys = keyring(&dir);
    let request = b"GET / HTTP/1.1\r\nHost: h\r\nX-Auth-User: alice\r\nx-auth-roles: admin\r\n\r\n";
    let out = sign(&keys, request);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        !out.stdout.to_ascii_lowercase().contains("x-auth-"),
        "{}",
        out.stdout
    );
    for part in [
        "countersign sign: note: stdin: X-Auth-User, x-auth-roles removed",
        "signed anonymous",
        "--user NAME",
    ] {
        assert!(out.stderr.contains(part), "{part:?}: {}", out.stderr);
    }
    let verified = verify(&keys, out.stdout.as_bytes(), CREATED);
    assert_eq!(
        verified.stdout,
        "{\"valid\":true,\"user\":null,\"roles\":[],\"keyid\":\"k1\"}\n"
    );
    // With --user, or without identity fields in the input, nothing to say.
    let with_user = run(&["sign", "--keyring", &keys, "--user", "alice"], request);
    assert_eq!((with_user.code, with_user.stderr.as_str()), (0, ""));
    let plain = sign(&keys, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!((plain.code, plain.stderr.as_str()), (0, ""));
}

/// The request file was a `String` argument: a file whose name is not UTF-8 (a Latin-1 name on
/// Linux) could not be signed or verified at all ("invalid UTF-8 was detected in one or more
/// arguments", naming no argument). Now it is a path like `--keyring`; messages show it with
/// U+FFFD where a byte is not UTF-8.
#[test]
fn a_request_file_whose_name_is_not_utf8() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt as _;
    let dir = TestDir::new("cli-qa");
    let keys = keyring(&dir);
    let request = dir.join(OsStr::from_bytes(b"caf\xe9.http"));
    std::fs::write(&request, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    let signed = support_cli::run_countersign(
        [
            OsStr::new("sign"),
            OsStr::new("--keyring"),
            OsStr::new(&keys),
            request.as_os_str(),
        ],
        b"",
    );
    let stderr = String::from_utf8_lossy(&signed.stderr);
    assert_eq!(signed.status.code(), Some(0), "{stderr}");
    let saved = dir.join(OsStr::from_bytes(b"sign\xe9d.http"));
    std::fs::write(&saved, &signed.stdout).unwrap();
    let verified = support_cli::run_countersign(
        [
            OsStr::new("verify"),
            OsStr::new("--keyring"),
            OsStr::new(&keys),
            saved.as_os_str(),
        ],
        b"",
    );
    assert_eq!(
        String::from_utf8_lossy(&verified.stdout),
        "{\"valid\":true,\"user\":null,\"roles\":[],\"keyid\":\"k1\"}\n",
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );

    std::fs::write(&request, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let refused = support_cli::run_countersign(
        [
            OsStr::new("sign"),
            OsStr::new("--keyring"),
            OsStr::new(&keys),
            request.as_os_str(),
        ],
        b"",
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("caf\u{FFFD}.http: "), "{stderr}");
}

/// `sign` read up to --max-headers (256) header lines and then added its own (up to six), so a
/// request near the limit came out beyond it and `verify` with the same defaults refused what
/// `sign` wrote (exit 2, "more than 256 header lines"); the same with --max-header-bytes. Now
/// `sign` holds its output to the limits (exit 2, naming the flag) and, with a larger limit on
/// both, the request round-trips.
#[test]
fn sign_never_writes_what_verify_with_the_same_limits_refuses() {
    let dir = TestDir::new("cli-qa");
    let keys = keyring(&dir);
    let fields: String = (0..255).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET / HTTP/1.1\r\nHost: h\r\n{fields}\r\n");
    let big = format!(
        "GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n",
        "a".repeat(65_400)
    );
    for (request, flag, larger) in [
        (&many, "--max-headers", "300"),
        (&big, "--max-header-bytes", "70000"),
    ] {
        // Within the limits as read.
        let read = run(&["verify", "--keyring", &keys], request.as_bytes());
        assert_eq!(
            read.stdout,
            "{\"valid\":false,\"reason\":\"missing_signature\"}\n"
        );
        let out = run(
            &["sign", "--keyring", &keys, "--user", "alice"],
            request.as_bytes(),
        );
        assert_eq!(out.code, 2, "{flag}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "{flag}");
        assert!(
            out.stderr
                .starts_with("countersign sign: stdin: signed, the request"),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains(&format!("more than {flag}")),
            "{}",
            out.stderr
        );

        let signed = run(
            &["sign", "--keyring", &keys, "--user", "alice", flag, larger],
            request.as_bytes(),
        );
        assert_eq!(signed.code, 0, "{flag}: {}", signed.stderr);
        let out = run(
            &["verify", "--keyring", &keys, flag, larger],
            signed.stdout.as_bytes(),
        );
        assert_eq!(
            out.stdout, "{\"valid\":true,\"user\":\"alice\",\"roles\":[],\"keyid\":\"k1\"}\n",
            "{flag}: {}",
            out.stderr
        );
    }
}

/// `keygen > keys.toml` leaves the secret in a file the umask makes readable by everyone
/// (0644), while docs/OPERATIONS.md asks for 0640 at most. `--out` creates the file with mode
/// 0600 from the start, refuses an existing one (leaving it as it was), and writes nothing to
/// stdout; the file is a working keyring.
#[test]
fn keygen_out_writes_a_private_new_file() {
    use std::os::unix::fs::PermissionsExt as _;

    let dir = TestDir::new("cli-qa-keygen-out");
    let path = dir.join("keys.toml");
    let path_text = path.display().to_string();
    let out = run(&["keygen", "--id", "k9", "--out", &path_text], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "", "the secret went to stdout too");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    let signed = sign(&path_text, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    assert!(signed.stdout.contains("keyid=\"k9\""), "{}", signed.stdout);

    let before = std::fs::read(&path).unwrap();
    let again = run(&["keygen", "--id", "k10", "--out", &path_text], b"");
    assert_eq!(again.code, 2, "{}", again.stderr);
    for part in [
        "keygen",
        "--out",
        "keys.toml",
        "the file exists",
        "never overwrites",
    ] {
        assert!(again.stderr.contains(part), "{part:?}: {}", again.stderr);
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "an existing keyring was changed"
    );
    // A folder that does not exist: the error names the path.
    let missing = dir.join("no/such/keys.toml").display().to_string();
    let out = run(&["keygen", "--out", &missing], b"");
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("no/such/keys.toml"), "{}", out.stderr);
}

/// `hash-password` on a terminal, as an operator runs it: `script` (util-linux, in every
/// Debian) gives it one. `typed` are typed one by one (a line with its `\n`, or a control
/// character), each after the prompt before it is shown. Returns the transcript (prompts, hash
/// and messages share the terminal) and the exit code. After `hash-password` exits, the shell
/// prints what it left unread on the terminal (`left over: [..]`) and, after a line `settings
/// after:`, the terminal's settings (`stty -a`).
fn hash_password_on_a_terminal(typed: &[&str]) -> (String, Option<i32>) {
    hash_password_on_a_terminal_then("", typed, None)
}

/// [`hash_password_on_a_terminal`] with `flags`, and `then`: keys typed a while after the last
/// line (none waits for a prompt).
fn hash_password_on_a_terminal_then(
    flags: &str,
    typed: &[&str],
    then: Option<(std::time::Duration, &str)>,
) -> (String, Option<i32>) {
    use std::io::Read as _;
    let mut child = Command::new("script")
        .args(["--quiet", "--return", "--command"])
        .arg(format!(
            "{BIN} hash-password {flags}; code=$?; read -t 1 -r left; echo \"left over: [$left]\"; \
             echo settings after:; stty -a; exit $code"
        ))
        // `read -t`: bash, not whatever `sh` is.
        .env("SHELL", "/bin/bash")
        .arg("/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("script (util-linux) runs");
    let mut stdout = child.stdout.take().unwrap();
    let (seen, transcript) = std::sync::mpsc::channel::<u8>();
    let reader = std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        while let Ok(1) = stdout.read(&mut byte) {
            let _ = seen.send(byte[0]);
        }
    });
    let mut text = Vec::new();
    let mut stdin = child.stdin.take().unwrap();
    for (n, keys) in typed.iter().enumerate() {
        let prompt = if n == 0 {
            "Password: "
        } else {
            "Password again: "
        };
        // The prompt, after what the previous line brought.
        let since = text.len();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !String::from_utf8_lossy(&text[since..]).contains(prompt) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match transcript.recv_timeout(left) {
                Ok(b) => text.push(b),
                Err(_) => panic!("no {prompt:?} prompt: {}", String::from_utf8_lossy(&text)),
            }
        }
        stdin.write_all(keys.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
    if let Some((wait, keys)) = then {
        std::thread::sleep(wait);
        stdin.write_all(keys.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
    let status = child.wait().unwrap();
    drop(stdin);
    reader.join().unwrap();
    text.extend(transcript.try_iter());
    (String::from_utf8_lossy(&text).into_owned(), status.code())
}

/// On a terminal the password is typed blind, so it is asked twice: a typo is refused (exit
/// 2, nothing hashed) instead of hashed into a users file whose login then fails.
#[test]
fn hash_password_on_a_terminal_asks_twice() {
    let (out, code) = hash_password_on_a_terminal(&["s3cret pass\n", "s3cret pass\n"]);
    assert_eq!(code, Some(0), "{out}");
    let hash = out
        .split_whitespace()
        .find(|w| w.starts_with("$argon2id$"))
        .unwrap_or_else(|| panic!("no hash: {out}"));
    use argon2::PasswordVerifier as _;
    let parsed = argon2::PasswordHash::new(hash).unwrap();
    assert!(argon2::Argon2::default()
        .verify_password(b"s3cret pass", &parsed)
        .is_ok());
    assert!(!out.contains("s3cret"), "the password was echoed: {out}");
    assert!(out.contains("left over: []"), "{out}");
    assert_echo_restored(&out);

    let (out, code) = hash_password_on_a_terminal(&["s3cret pass\n", "s3cret pas\n"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("countersign hash-password: the two passwords typed differ"),
        "{out}"
    );
    assert!(!out.contains("$argon2id$"), "{out}");
    assert!(!out.contains("s3cret"), "the password was echoed: {out}");
    assert_echo_restored(&out);
}

/// A line over the limit is refused, and read to its end first: what is left of it on the
/// terminal would be the shell's next command line once `hash-password` exits.
#[test]
fn hash_password_on_a_terminal_refuses_a_long_line_whole() {
    let long = format!("{}\n", "x".repeat(1500));
    let (out, code) = hash_password_on_a_terminal(&[&long]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("countersign hash-password: password longer than 1024 bytes"),
        "{out}"
    );
    assert!(out.contains("left over: []"), "{out}");
    assert!(!out.contains("xxx"), "the password was echoed: {out}");
    assert_echo_restored(&out);
}

/// With `--max-password-bytes` above the terminal's line limit (4095 bytes), a line that
/// reaches it is refused: the terminal may have dropped the rest, the same way at both prompts,
/// and the hash would be of a password the user never meant. Below the limit, a long line is
/// hashed.
#[test]
fn hash_password_on_a_terminal_refuses_a_line_the_terminal_may_have_cut() {
    let long = format!("{}\n", "x".repeat(5000));
    let (out, code) = hash_password_on_a_terminal_then("--max-password-bytes 8192", &[&long], None);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("may have been cut by the terminal (its line limit): pipe a password"),
        "{out}"
    );
    assert!(!out.contains("$argon2id$"), "{out}");
    assert_echo_restored(&out);

    let line = format!("{}\n", "y".repeat(3000));
    let (out, code) = hash_password_on_a_terminal_then(
        "--max-password-bytes 8192 --memory 8MiB --iterations 1",
        &[&line, &line],
        None,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("$argon2id$"), "{out}");
    assert!(out.contains("warning: the password is 3000 bytes"), "{out}");
}

/// Ctrl-C at a prompt (echo off) ends `hash-password` with 130, as `SIGINT` would, but with
/// the terminal's settings put back: the shell goes on (it does not when its command was killed
/// by the signal), and with echo on. At the second prompt too, with a password already typed.
#[test]
fn hash_password_on_a_terminal_gives_the_terminal_back_on_ctrl_c() {
    for typed in [&["\x03"][..], &["s3cret pass\n", "s3cr\x03"]] {
        let (out, code) = hash_password_on_a_terminal(typed);
        assert_eq!(code, Some(130), "{out}");
        assert!(!out.contains("$argon2id$"), "{out}");
        assert!(!out.contains("s3cr"), "the password was echoed: {out}");
        assert!(out.contains("left over: []"), "{out}");
        assert_echo_restored(&out);
    }
}

/// Ctrl-C during the hash, once both lines are typed, ends `hash-password` at once with 130,
/// nothing printed. The signals caught for the prompts cannot be given back their default
/// action, so before, a Ctrl-C during the hash was ignored and the hash printed after all.
/// `--iterations 10` at 64 MiB takes seconds in a test build; the Ctrl-C comes 300 ms after
/// the second line. (Should the line not have been read by then, the Ctrl-C ends the typing
/// instead, also with 130: the test cannot fail for a slow start, only pass without proving.)
#[test]
fn hash_password_on_a_terminal_is_ended_by_ctrl_c_during_the_hash() {
    let (out, code) = hash_password_on_a_terminal_then(
        "--memory 64MiB --iterations 10",
        &["s3cret pass\n", "s3cret pass\n"],
        Some((std::time::Duration::from_millis(300), "\x03")),
    );
    assert_eq!(code, Some(130), "{out}");
    assert!(!out.contains("$argon2id$"), "{out}");
    assert!(!out.contains("s3cret"), "the password was echoed: {out}");
    assert!(out.contains("left over: []"), "{out}");
    assert_echo_restored(&out);
}

/// Echo is off only while the password is typed: the terminal has its settings back (echo on,
/// line ends not echoed on their own) once `hash-password` exits, whether it hashed or refused.
fn assert_echo_restored(transcript: &str) {
    let (_, after) = transcript
        .split_once("settings after:")
        .unwrap_or_else(|| panic!("no settings printed: {transcript}"));
    let settings: Vec<&str> = after.split_whitespace().collect();
    assert!(settings.contains(&"echo"), "echo left off: {after}");
    assert!(settings.contains(&"-echonl"), "echonl left on: {after}");
}

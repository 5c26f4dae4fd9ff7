//! The `keygen`, `sign` and `verify` commands, run as the built binary: the documented contract
//! (output, JSON line, exit codes 0/1/2), every keyring error, hostile input, and a signed
//! request accepted by a real hyper server on loopback.
#![cfg(feature = "proxy")]

mod support_cli;
mod support_tmp;

use std::path::Path;

use support_cli::run_countersign;
use support_tmp::TestDir;

/// 32 bytes 0x00..0x1f, base64.
const SECRET_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// 32 bytes of 0x42.
const SECRET_B: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";

const CREATED: u64 = 1_700_000_000;
const NONCE: &str = "c2lnbmF0dXJlLW5vbmNlLTAx";

const REQUEST: &[u8] = b"POST /orders/42?expand=items&x=%20y HTTP/1.1\r\n\
Host: API.Example.com:80\r\n\
Content-Type: application/json\r\n\
X-Request-Id: abc\r\n\
x-request-id: def\r\n\
Content-Length: 15\r\n\
\r\n\
{\"qty\":3,\"a\":1}";

struct Output {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Output {
    fn stdout_str(&self) -> String {
        String::from_utf8(self.stdout.clone()).unwrap()
    }
    fn json(&self) -> serde_json::Value {
        let text = self.stdout_str();
        assert_eq!(
            text.matches('\n').count(),
            1,
            "exactly one line expected: {text:?}"
        );
        serde_json::from_str(text.trim_end()).unwrap()
    }
    fn assert_no_panic(&self) {
        assert!(!self.stderr.contains("panicked"), "panic: {}", self.stderr);
        assert_ne!(
            self.code, 101,
            "exit code 101 is a Rust panic: {}",
            self.stderr
        );
    }
}

fn run(args: &[&str], stdin: &[u8]) -> Output {
    let out = run_countersign(args, stdin);
    let output = Output {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    output.assert_no_panic();
    output
}

/// A fresh folder under the system temp dir, removed when dropped.
fn temp_dir() -> TestDir {
    TestDir::new("cli")
}

fn keyring_file(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn keyring_with(dir: &Path, id: &str, secret: &str) -> String {
    keyring_file(
        dir,
        &format!("{id}-{}.toml", &secret[..4]),
        &format!("active = \"{id}\"\n[[keys]]\nid = \"{id}\"\nsecret = \"{secret}\"\n"),
    )
}

/// Signs REQUEST (or `request`) with fixed created/nonce and the given identity.
fn sign_with(keyring: &str, request: &[u8], extra: &[&str]) -> Output {
    let created = CREATED.to_string();
    let mut args = vec![
        "sign",
        "--keyring",
        keyring,
        "--created",
        &created,
        "--nonce",
        NONCE,
    ];
    args.extend_from_slice(extra);
    run(&args, request)
}

fn verify_at(keyring: &str, request: &[u8], now: u64, extra: &[&str]) -> Output {
    let now = now.to_string();
    let mut args = vec!["verify", "--keyring", keyring, "--now", &now];
    args.extend_from_slice(extra);
    run(&args, request)
}

fn assert_invalid(out: &Output, reason: &str) {
    assert_eq!(out.code, 1, "stderr: {}", out.stderr);
    assert_eq!(
        out.stdout_str(),
        format!("{{\"valid\":false,\"reason\":\"{reason}\"}}\n")
    );
}

fn assert_exit2(out: &Output, message_part: &str) {
    assert_eq!(
        out.code,
        2,
        "stdout: {:?} stderr: {}",
        out.stdout_str(),
        out.stderr
    );
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout on a usage error: {:?}",
        out.stdout_str()
    );
    assert!(
        out.stderr.contains(message_part),
        "stderr {:?} should mention {message_part:?}",
        out.stderr
    );
}

fn split_message(signed: &[u8]) -> (String, Vec<u8>) {
    let at = signed.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    (
        String::from_utf8(signed[..at].to_vec()).unwrap(),
        signed[at + 4..].to_vec(),
    )
}

#[test]
fn keygen_prints_a_loadable_entry() {
    let out = run(&["keygen", "--id", "main"], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let text = out.stdout_str();
    assert!(text.contains("active = \"main\""), "{text}");
    // `countersign keygen > keys.toml` is a working keyring.
    let dir = temp_dir();
    let path = dir.join("keys.toml");
    std::fs::write(&path, &text).unwrap();
    let keyring = countersign::keyfile::load_keyring(&path).unwrap();
    assert_eq!(keyring.active_id(), "main");

    // The file signs and verifies through the CLI.
    let path = path.display().to_string();
    let signed = run(&["sign", "--keyring", &path], REQUEST);
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let verified = run(&["verify", "--keyring", &path], &signed.stdout);
    assert_eq!(
        verified.stdout_str(),
        "{\"valid\":true,\"user\":null,\"roles\":[],\"keyid\":\"main\"}\n"
    );
    assert_eq!(verified.code, 0);

    // Two runs, two secrets.
    assert_ne!(run(&["keygen"], b"").stdout, run(&["keygen"], b"").stdout);
}

#[test]
fn keygen_rejects_unusable_id() {
    assert_exit2(&run(&["keygen", "--id", "a\"b"], b""), "--id");
    // The keyring's rule (docs/PROTOCOL.md §5), stated in the message: no spaces.
    for id in ["a b", "", "k\\1", "zoë"] {
        let out = run(&["keygen", "--id", id], b"");
        assert_exit2(&out, "--id");
        assert!(out.stderr.contains("visible ASCII"), "{}", out.stderr);
        assert!(out.stderr.contains("no space"), "{}", out.stderr);
    }
    // What keygen accepts, the keyring loader loads.
    let dir = temp_dir();
    let id = "key/2025-01:a~!";
    let out = run(&["keygen", "--id", id], b"");
    assert_eq!(out.code, 0, "{}", out.stderr);
    let path = dir.join("keys.toml");
    std::fs::write(&path, out.stdout_str()).unwrap();
    let keyring = countersign::keyfile::load_keyring(&path).unwrap();
    assert_eq!(keyring.active_id(), id);
}

#[test]
fn sign_then_verify_round_trips_unicode_identity() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let user = "Zoë 名前 🦀, \"quoted\"";
    let signed = sign_with(
        &keys,
        REQUEST,
        &["--user", user, "--roles", "admin,rôle,ops team"],
    );
    assert_eq!(signed.code, 0, "{}", signed.stderr);

    let out = verify_at(&keys, &signed.stdout, CREATED + 3, &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout_str(),
        format!(
            "{{\"valid\":true,\"user\":{},\"roles\":[\"admin\",\"rôle\",\"ops team\"],\"keyid\":\"k1\"}}\n",
            serde_json::to_string(user).unwrap()
        )
    );
    let json = out.json();
    assert_eq!(json["user"], user);
}

#[test]
fn sign_keeps_the_request_and_appends_the_signature_fields() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let signed = sign_with(&keys, REQUEST, &["--user", "alice", "--roles", "admin"]);
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let (head, body) = split_message(&signed.stdout);
    assert_eq!(body, b"{\"qty\":3,\"a\":1}");
    let lines: Vec<&str> = head.split("\r\n").collect();
    // Request line and received fields verbatim, in order, original case.
    assert_eq!(
        &lines[..6],
        [
            "POST /orders/42?expand=items&x=%20y HTTP/1.1",
            "Host: API.Example.com:80",
            "Content-Type: application/json",
            "X-Request-Id: abc",
            "x-request-id: def",
            "Content-Length: 15",
        ]
    );
    assert_eq!(
        lines[6],
        "Content-Digest: sha-256=:+cd+gPmdKvNpJYZorPnj5SYWMWP/QBbnF0mugqKFsLg=:"
    );
    assert_eq!(lines[7], "X-Auth-User: alice");
    assert_eq!(lines[8], "X-Auth-Roles: admin");
    assert_eq!(
        lines[9],
        format!(
            "Signature-Input: countersign=(\"@method\" \"@authority\" \"@path\" \"@query\" \"content-digest\" \"x-auth-user\" \"x-auth-roles\");created={CREATED};expires={};nonce=\"{NONCE}\";keyid=\"k1\";alg=\"hmac-sha256\";tag=\"countersign\"",
            CREATED + 10
        )
    );
    assert!(
        lines[10].starts_with("Signature: countersign=:") && lines[10].ends_with(":"),
        "{}",
        lines[10]
    );
    assert_eq!(lines.len(), 11);

    // Deterministic for fixed inputs: same bytes twice.
    assert_eq!(
        sign_with(&keys, REQUEST, &["--user", "alice", "--roles", "admin"]).stdout,
        signed.stdout
    );

    // --window sets expires: seconds, or a duration as proxy.toml writes signing.window.
    let wide = sign_with(&keys, REQUEST, &["--window", "60"]);
    assert!(wide
        .stdout_str()
        .contains(&format!("expires={}", CREATED + 60)));
    assert_eq!(
        sign_with(&keys, REQUEST, &["--window", "1m"]).stdout,
        wide.stdout
    );
    assert_eq!(
        sign_with(&keys, REQUEST, &["--window", "60s"]).stdout,
        wide.stdout
    );
}

#[test]
fn sign_replaces_stale_signature_and_identity_fields() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let stale = b"GET /x HTTP/1.1\r\nHost: h\r\nSignature: old=:AAAA:\r\nSignature-Input: old=();created=1\r\nX-Auth-User: mallory\r\nX-Auth-Roles: root\r\nContent-Digest: sha-256=:AAAA:\r\n\r\n";
    let signed = sign_with(&keys, stale, &["--user", "alice"]);
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let text = signed.stdout_str();
    assert!(
        !text.contains("mallory") && !text.contains("root") && !text.contains("old="),
        "{text}"
    );
    assert_eq!(text.matches("X-Auth-User").count(), 1);
    let out = verify_at(&keys, &signed.stdout, CREATED, &[]);
    assert_eq!(
        out.stdout_str(),
        "{\"valid\":true,\"user\":\"alice\",\"roles\":[],\"keyid\":\"k1\"}\n"
    );
}

#[test]
fn body_to_eof_gets_a_content_length_and_verifies() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let signed = sign_with(
        &keys,
        b"PUT /blob HTTP/1.1\nHost: h\n\nraw bytes to eof",
        &[],
    );
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let (head, body) = split_message(&signed.stdout);
    assert!(head.contains("Content-Length: 16"), "{head}");
    assert_eq!(body, b"raw bytes to eof");
    assert_eq!(verify_at(&keys, &signed.stdout, CREATED, &[]).code, 0);
}

#[test]
fn request_read_from_a_file() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let req = dir.join("req.http");
    std::fs::write(&req, REQUEST).unwrap();
    let signed = sign_with(&keys, b"", &[req.to_str().unwrap()]);
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let signed_path = dir.join("signed.http");
    std::fs::write(&signed_path, &signed.stdout).unwrap();
    let out = verify_at(&keys, b"", CREATED, &[signed_path.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_exit2(
        &verify_at(
            &keys,
            b"",
            CREATED,
            &[dir.join("missing.http").to_str().unwrap()],
        ),
        "missing.http",
    );
}

#[test]
fn tampered_body_is_digest_mismatch() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let signed = sign_with(&keys, REQUEST, &["--user", "alice"]).stdout;
    let mut tampered = signed.clone();
    let last = tampered.len() - 2; // inside the body, same length
    tampered[last] = b'9';
    assert_invalid(
        &verify_at(&keys, &tampered, CREATED, &[]),
        "digest_mismatch",
    );
}

#[test]
fn tampered_covered_parts_are_bad_signature() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let signed = sign_with(&keys, REQUEST, &["--user", "alice", "--roles", "admin"]).stdout_str();
    for (from, to) in [
        ("X-Auth-User: alice", "X-Auth-User: mallory"),
        ("X-Auth-Roles: admin", "X-Auth-Roles: root"),
        ("POST /orders/42", "PUT /orders/42"),
        ("/orders/42?", "/orders/43?"),
        ("expand=items", "expand=itemz"),
        ("Host: API.Example.com:80", "Host: evil.example.com"),
    ] {
        assert!(signed.contains(from));
        let out = verify_at(&keys, signed.replacen(from, to, 1).as_bytes(), CREATED, &[]);
        assert_invalid(&out, "bad_signature");
    }
    // Dropping a covered identity header breaks the base too.
    let out = verify_at(
        &keys,
        signed.replacen("X-Auth-Roles: admin\r\n", "", 1).as_bytes(),
        CREATED,
        &[],
    );
    assert_eq!(out.code, 1);
}

#[test]
fn time_window_edges() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let signed = sign_with(&keys, REQUEST, &[]).stdout;
    assert_eq!(
        verify_at(&keys, &signed, CREATED + 10 + 2, &[]).code,
        0,
        "window + skew still valid"
    );
    assert_invalid(
        &verify_at(&keys, &signed, CREATED + 10 + 2 + 1, &[]),
        "expired",
    );
    assert_invalid(
        &verify_at(&keys, &signed, CREATED + 1_000_000, &[]),
        "expired",
    );
    assert_invalid(
        &verify_at(&keys, &signed, CREATED - 3, &[]),
        "not_yet_valid",
    );
    // --window and --skew widen what verify accepts.
    assert_eq!(
        verify_at(&keys, &signed, CREATED - 3, &["--skew", "5"]).code,
        0
    );
    let wide = sign_with(&keys, REQUEST, &["--window", "100"]).stdout;
    assert_eq!(
        verify_at(&keys, &wide, CREATED + 50, &["--window", "100"]).code,
        0
    );
    assert_invalid(&verify_at(&keys, &wide, CREATED + 50, &[]), "expired");
    // In proxy.toml's spelling too (`signing.window = "10s"`): it was "invalid digit".
    let wide_verify = ["--window", "100s", "--skew", "0s"];
    assert_eq!(verify_at(&keys, &wide, CREATED + 50, &wide_verify).code, 0);
    let fraction = verify_at(&keys, &wide, CREATED + 50, &["--window", "1500ms"]);
    assert_eq!(fraction.code, 2, "{}", fraction.stderr);
    assert!(
        fraction.stderr.contains("whole number of seconds"),
        "{}",
        fraction.stderr
    );
}

#[test]
fn wrong_key_is_unknown_key_and_wrong_secret_is_bad_signature() {
    let dir = temp_dir();
    let k1 = keyring_with(&dir, "k1", SECRET_A);
    let k2 = keyring_with(&dir, "k2", SECRET_A);
    let k1_other_secret = keyring_with(&dir, "k1", SECRET_B);
    let signed = sign_with(&k1, REQUEST, &[]).stdout;
    assert_invalid(&verify_at(&k2, &signed, CREATED, &[]), "unknown_key");
    assert_invalid(
        &verify_at(&k1_other_secret, &signed, CREATED, &[]),
        "bad_signature",
    );
}

#[test]
fn retired_key_no_longer_verifies() {
    let dir = temp_dir();
    let old = keyring_with(&dir, "old", SECRET_A);
    let signed = sign_with(&old, REQUEST, &[]).stdout;
    let rotated = keyring_file(
        &dir,
        "rotated.toml",
        &format!("active = \"new\"\n[[keys]]\nid = \"new\"\nsecret = \"{SECRET_B}\"\n[[keys]]\nid = \"old\"\nsecret = \"{SECRET_A}\"\n"),
    );
    assert_eq!(
        verify_at(&rotated, &signed, CREATED, &[]).code,
        0,
        "listed old key still verifies"
    );
    let retired = keyring_file(
        &dir,
        "retired.toml",
        &format!("active = \"new\"\n[[keys]]\nid = \"new\"\nsecret = \"{SECRET_B}\"\n[[keys]]\nid = \"old\"\nsecret = \"{SECRET_A}\"\nretired = true\n"),
    );
    assert_invalid(&verify_at(&retired, &signed, CREATED, &[]), "unknown_key");
}

#[test]
fn rotating_keyring_signs_with_epoch_keyids() {
    let dir = temp_dir();
    let keys = keyring_file(
        &dir,
        "rot.toml",
        &format!(
            "active = \"k\"\nrotation = \"1h\"\n[[keys]]\nid = \"k\"\nsecret = \"{SECRET_A}\"\n"
        ),
    );
    let signed = sign_with(&keys, REQUEST, &[]);
    assert!(signed
        .stdout_str()
        .contains(&format!("keyid=\"k.{}\"", CREATED / 3600)));
    let out = verify_at(&keys, &signed.stdout, CREATED, &[]);
    assert_eq!(out.json()["keyid"], format!("k.{}", CREATED / 3600));
}

#[test]
fn unsigned_and_half_signed_requests() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    assert_invalid(
        &verify_at(&keys, REQUEST, CREATED, &[]),
        "missing_signature",
    );
    let signed = sign_with(&keys, REQUEST, &[]).stdout_str();
    let no_sig: String = signed
        .lines()
        .filter(|l| !l.starts_with("Signature: "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_invalid(
        &verify_at(&keys, no_sig.as_bytes(), CREATED, &[]),
        "missing_signature",
    );
    let garbled = signed.replacen(
        "Signature-Input: countersign=(",
        "Signature-Input: countersign=((",
        1,
    );
    assert_invalid(
        &verify_at(&keys, garbled.as_bytes(), CREATED, &[]),
        "malformed_signature",
    );
}

// ---- keyring errors: exit 2 with a message naming the problem, for sign and verify alike ----

#[test]
fn keyring_errors_exit_2_with_the_message() {
    let dir = temp_dir();
    let missing = dir.join("missing.toml").display().to_string();
    let bad_toml = keyring_file(&dir, "bad.toml", "active = \"k1\"\n[[keys]\n");
    let short = keyring_file(
        &dir,
        "short.toml",
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"AAECAwQFBgcICQoLDA0ODw==\"\n",
    );
    let unknown_active = keyring_file(
        &dir,
        "active.toml",
        &format!("active = \"k9\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n"),
    );
    let bad_b64 = keyring_file(
        &dir,
        "b64.toml",
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"***\"\n",
    );
    let cases: [(&str, &[&str]); 5] = [
        (&missing, &["missing.toml", "cannot read"]),
        (&bad_toml, &["bad.toml", "line 2"]),
        (
            &short,
            &["short.toml", "keys[0].secret", "16 bytes, at least 32"],
        ),
        (&unknown_active, &["active.toml", "\"k9\" is not listed"]),
        (&bad_b64, &["b64.toml", "keys[0].secret", "base64"]),
    ];
    for (file, parts) in cases {
        let signed = run(&["sign", "--keyring", file], REQUEST);
        let verified = run(&["verify", "--keyring", file], REQUEST);
        for out in [&signed, &verified] {
            for part in parts {
                assert_exit2(out, part);
            }
        }
        assert!(
            signed.stderr.starts_with("countersign sign: "),
            "{}",
            signed.stderr
        );
        assert!(
            verified.stderr.starts_with("countersign verify: "),
            "{}",
            verified.stderr
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    assert_exit2(
        &run(&["sign", "--keyring", &keys, "--roles", "admin"], REQUEST),
        "--user",
    );
    assert_exit2(&run(&["sign"], REQUEST), "--keyring");
    assert_exit2(
        &run(
            &["verify", "--keyring", &keys, "--now", "yesterday"],
            REQUEST,
        ),
        "--now",
    );
    assert_exit2(
        &run(
            &[
                "sign",
                "--keyring",
                &keys,
                "--nonce",
                "has space but is long enough",
            ],
            REQUEST,
        ),
        "--nonce",
    );
    assert_exit2(
        &run(&["sign", "--keyring", &keys, "--nonce", "short"], REQUEST),
        "at least 22",
    );
    assert_exit2(
        &run(&["sign", "--keyring", &keys], b"GET / HTTP/1.1\r\n\r\n"),
        "Host",
    );
    // A zero window signs a request that expires as it is made (`expires == created`): the
    // proxy's `signing.window` and `demo-api --window` refuse it, and so does `sign`.
    assert_exit2(
        &run(&["sign", "--keyring", &keys, "--window", "0"], REQUEST),
        "--window",
    );
}

/// `created` and `expires` must fit an RFC 8941 integer (15 digits): beyond it `sign` exits 2
/// and writes nothing (its output would be `malformed_signature` for every verifier); at the
/// edge it signs and the request verifies.
#[test]
fn sign_refuses_times_beyond_15_digits() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    for (created, window, message) in [
        (
            "999999999999999",
            "10",
            "expires (created 999999999999999 + window 10s) exceeds",
        ),
        (
            "999999999999990",
            "10",
            "expires (created 999999999999990 + window 10s) exceeds",
        ),
        ("1000000000000000", "1", "created 1000000000000000 exceeds"),
        (
            "18446744073709551615",
            "10",
            "created 18446744073709551615 exceeds",
        ),
        (
            "1700000000",
            "18446744073709551615",
            "window 18446744073709551615s) exceeds",
        ),
    ] {
        let out = run(
            &[
                "sign",
                "--keyring",
                &keys,
                "--created",
                created,
                "--window",
                window,
                "--nonce",
                NONCE,
            ],
            REQUEST,
        );
        assert_exit2(&out, message);
        assert!(out.stderr.contains("at most 15 digits"), "{}", out.stderr);
    }
    let edge = 999_999_999_999_989u64;
    let out = run(
        &[
            "sign",
            "--keyring",
            &keys,
            "--created",
            &edge.to_string(),
            "--nonce",
            NONCE,
        ],
        REQUEST,
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let verified = verify_at(&keys, &out.stdout, edge, &[]);
    assert_eq!(verified.code, 0, "{}", verified.stderr);
}

/// docs/PROTOCOL.md §4: no empty user or role name. `--roles ''` (or none) is a user without
/// roles; an empty role anywhere in the list, or an empty `--user`, exits 2 naming the option.
#[test]
fn sign_refuses_empty_user_or_role() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    assert_exit2(&sign_with(&keys, REQUEST, &["--user", ""]), "--user");
    assert_exit2(
        &sign_with(&keys, REQUEST, &["--user", "", "--roles", "a"]),
        "user name is empty",
    );
    for (roles, message) in [
        ("a,,b", "role 2 of 3 is empty"),
        (",", "role 1 of 2 is empty"),
        (",a", "role 1 of 2 is empty"),
        ("a,", "role 2 of 2 is empty"),
    ] {
        let out = sign_with(&keys, REQUEST, &["--user", "u", "--roles", roles]);
        assert_exit2(&out, "--roles");
        assert!(out.stderr.contains(message), "{roles:?}: {}", out.stderr);
    }
    for roles in [&["--roles", ""][..], &[]] {
        let mut args = vec!["--user", "u"];
        args.extend_from_slice(roles);
        let signed = sign_with(&keys, REQUEST, &args);
        assert_eq!(signed.code, 0, "{}", signed.stderr);
        assert!(!signed.stdout_str().contains("X-Auth-Roles"));
        let out = verify_at(&keys, &signed.stdout, CREATED, &[]);
        assert_eq!(
            out.stdout_str(),
            "{\"valid\":true,\"user\":\"u\",\"roles\":[],\"keyid\":\"k1\"}\n"
        );
    }
}

/// A request with two `Host` lines (invalid, RFC 9112 §3.2) is named as such: `sign` exits 2,
/// `verify` answers `malformed_signature`, both saying "more than one Host field line".
#[test]
fn two_host_lines_are_named() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let req = b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n";
    let out = sign_with(&keys, req, &[]);
    assert_exit2(&out, "more than one Host field line");
    assert!(!out.stderr.contains("non-ASCII"), "{}", out.stderr);

    // Signed with one Host, received with a second one.
    let signed = sign_with(&keys, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n", &[]);
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let (head, body) = split_message(&signed.stdout);
    let doubled = format!("{head}\r\nHost: b.example\r\n\r\n");
    assert!(body.is_empty());
    let out = verify_at(&keys, doubled.as_bytes(), CREATED, &[]);
    assert_invalid(&out, "malformed_signature");
    assert!(
        out.stderr.contains("more than one Host field line"),
        "{}",
        out.stderr
    );
}

/// One request per input: after a Content-Length body only a final line break may follow.
/// More (a second, pipelined request) is refused by `sign` and `verify` alike, exit 2.
/// A chunked request (`Transfer-Encoding: chunked`) is signed over its content: the output stays
/// chunked, as one chunk, with the same `Content-Digest` as the same content sent with
/// `Content-Length`; it verifies however it is chunked on the way, and a changed byte in a chunk
/// is `digest_mismatch`.
#[test]
fn chunked_bodies_are_signed_over_their_content() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let head = "POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunked = format!("{head}5;part=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    let signed = sign_with(&keys, chunked.as_bytes(), &["--user", "alice"]);
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let (signed_head, body) = split_message(&signed.stdout);
    assert!(
        signed_head.contains("\r\nTransfer-Encoding: chunked\r\n"),
        "{signed_head}"
    );
    assert!(!signed_head.contains("Content-Length"), "{signed_head}");
    assert_eq!(body, b"b\r\nhello world\r\n0\r\n\r\n");

    let digest_line = |head: &str| {
        head.lines()
            .find(|line| line.starts_with("Content-Digest: sha-256=:"))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no Content-Digest: {head}"))
    };
    let plain = sign_with(
        &keys,
        b"POST /up HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world",
        &["--user", "alice"],
    );
    assert_eq!(plain.code, 0, "{}", plain.stderr);
    assert_eq!(
        digest_line(&signed_head),
        digest_line(&split_message(&plain.stdout).0)
    );

    let ok = verify_at(&keys, &signed.stdout, CREATED, &[]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    assert_eq!(ok.json()["user"], "alice");
    // Chunked differently on the way: the same content, still valid.
    let rechunked =
        format!("{signed_head}\r\n\r\n3\r\nhel\r\n1;x\r\nl\r\n6\no worl\n1\r\nd\r\n0\r\n\r\n");
    let ok = verify_at(&keys, rechunked.as_bytes(), CREATED, &[]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let tampered = format!("{signed_head}\r\n\r\nb\r\nhello World\r\n0\r\n\r\n");
    assert_invalid(
        &verify_at(&keys, tampered.as_bytes(), CREATED, &[]),
        "digest_mismatch",
    );

    // An empty chunked body: the empty content's digest, written as the last chunk alone.
    let empty = sign_with(&keys, format!("{head}0\r\n\r\n").as_bytes(), &[]);
    assert_eq!(empty.code, 0, "{}", empty.stderr);
    let (empty_head, body) = split_message(&empty.stdout);
    assert_eq!(body, b"0\r\n\r\n");
    assert!(
        empty_head.contains("sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"),
        "{empty_head}"
    );
    assert_eq!(verify_at(&keys, &empty.stdout, CREATED, &[]).code, 0);
}

/// A `Content-Length` that is not a decimal number is refused by both commands (exit 2), and
/// its value is not quoted: header values never are, one may hold a credential (it was).
#[test]
fn an_invalid_content_length_is_refused_without_its_value() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    for value in ["s3cret-token", "-1", "5, 5", "0x10"] {
        let input = format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {value}\r\n\r\nhello");
        for out in [
            sign_with(&keys, input.as_bytes(), &[]),
            verify_at(&keys, input.as_bytes(), CREATED, &[]),
        ] {
            assert_exit2(&out, "invalid Content-Length (not a decimal number)");
            assert!(!out.stderr.contains(value), "{value}: {}", out.stderr);
        }
    }
}

/// Chunked framing that cannot be read one way only is refused by both commands (exit 2, the
/// problem named); a chunked body over `--max-body-bytes` is an error for `sign` and
/// `body_too_large` for `verify`.
#[test]
fn unusable_chunked_framing_is_refused() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    for (fields, chunks, message) in [
        (
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "5\r\nhello\r\n0\r\n\r\n",
            "both Content-Length and Transfer-Encoding",
        ),
        (
            "Transfer-Encoding: gzip, chunked\r\n",
            "0\r\n\r\n",
            "Transfer-Encoding other than `chunked` alone",
        ),
        (
            "Transfer-Encoding: chunked\r\n",
            "5\r\nhello\r\n0\r\nX-Auth-User: mallory\r\n\r\n",
            "trailer fields after the last chunk are not supported",
        ),
        (
            "Transfer-Encoding: chunked\r\n",
            "5\r\nhel",
            "truncated: chunk 1 ends after 3 of its 5 bytes",
        ),
        (
            "Transfer-Encoding: chunked\r\n",
            "zz\r\n",
            "chunk 1: the size line is not a hexadecimal size",
        ),
    ] {
        let input = format!("POST / HTTP/1.1\r\nHost: h\r\n{fields}\r\n{chunks}");
        assert_exit2(&sign_with(&keys, input.as_bytes(), &[]), message);
        assert_exit2(&verify_at(&keys, input.as_bytes(), CREATED, &[]), message);
    }
    let big = "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
               3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n";
    assert_exit2(
        &sign_with(&keys, big.as_bytes(), &["--max-body-bytes", "5"]),
        "body exceeds 5 bytes",
    );
    let signed = sign_with(&keys, big.as_bytes(), &[]);
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    assert_invalid(
        &verify_at(&keys, &signed.stdout, CREATED, &["--max-body-bytes", "5"]),
        "body_too_large",
    );
}

#[test]
fn bytes_after_the_body_are_refused() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let signed = sign_with(&keys, REQUEST, &[]);
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let second = b"GET /admin HTTP/1.1\r\nHost: api.example.com\r\n\r\n";
    for tail in [&second[..], b"X", b"\n\n"] {
        let input = [REQUEST, tail].concat();
        assert_exit2(
            &sign_with(&keys, &input, &[]),
            "continues after the 15-byte body",
        );
        let input = [&signed.stdout[..], tail].concat();
        assert_exit2(
            &verify_at(&keys, &input, CREATED, &[]),
            "continues after the 15-byte body",
        );
    }
    // An editor's final newline is not a second request.
    for tail in [&b"\n"[..], b"\r\n"] {
        let input = [REQUEST, tail].concat();
        let out = sign_with(&keys, &input, &[]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(out.stdout, signed.stdout);
        let input = [&signed.stdout[..], tail].concat();
        assert_eq!(verify_at(&keys, &input, CREATED, &[]).code, 0);
    }
}

// ---- hostile input: exit 2 with a message, never a panic ----

#[test]
fn garbage_input_exits_2() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let huge_line = vec![b'A'; 200_000];
    let inputs: [(&[u8], &str); 7] = [
        (b"", "empty input"),
        (b"garbage\n", "request line"),
        (
            b"\x00\xff\xfe binary \x01\x02\r\n\r\n",
            "not an HTTP/1.1 request",
        ),
        (b"GET / HTTP/1.1\r\nHost: h\r\n", "truncated"),
        (b"GET / HTTP/9.9\r\nHost: h\r\n\r\n", "HTTP version"),
        (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 50\r\n\r\nshort",
            "shorter than Content-Length",
        ),
        (&huge_line, "exceed"),
    ];
    for (input, part) in inputs {
        for cmd in ["sign", "verify"] {
            let out = run(
                &[cmd, "--keyring", &keys, "--created", "1"][..if cmd == "sign" { 5 } else { 3 }],
                input,
            );
            assert_exit2(&out, part);
            assert!(out.stderr.contains("stdin"), "{}", out.stderr);
        }
    }
}

#[test]
fn oversized_headers_and_bodies_are_refused() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let many_headers: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET / HTTP/1.1\r\nHost: h\r\n{many_headers}\r\n");
    assert_exit2(
        &run(&["verify", "--keyring", &keys], req.as_bytes()),
        "more than 256 header lines (--max-headers)",
    );
    assert_exit2(
        &run(
            &["sign", "--keyring", &keys, "--max-header-bytes", "20"],
            REQUEST,
        ),
        "exceed 20 bytes",
    );

    let signed = sign_with(&keys, REQUEST, &[]).stdout;
    assert_exit2(
        &run(
            &["sign", "--keyring", &keys, "--max-body-bytes", "4"],
            REQUEST,
        ),
        "body exceeds 4 bytes",
    );
    // For verify an oversized body is a documented verification answer.
    let out = verify_at(&keys, &signed, CREATED, &["--max-body-bytes", "4"]);
    assert_invalid(&out, "body_too_large");
    // But, as at the VerifyLayer, the headers and MAC are checked first and the first failure
    // decides: an unsigned or expired request is that, however large its body (both were
    // body_too_large).
    let huge_declared = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999\r\n\r\n";
    assert_invalid(
        &verify_at(&keys, huge_declared, CREATED, &[]),
        "missing_signature",
    );
    let out = verify_at(&keys, &signed, CREATED + 3600, &["--max-body-bytes", "4"]);
    assert_invalid(&out, "expired");
    // A body streamed to EOF beyond the default 16 MiB is cut off, not buffered without end.
    let mut endless = b"PUT / HTTP/1.1\r\nHost: h\r\n\r\n".to_vec();
    endless.resize(endless.len() + 16 * 1024 * 1024 + 10, b'x');
    assert_exit2(
        &run(&["sign", "--keyring", &keys], &endless),
        "body exceeds 16777216 bytes",
    );
}

#[test]
fn http_that_the_http_crate_cannot_represent() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    // httparse accepts a backquote in the target; `http::Uri` does not.
    // Not a request `verify` can read: exit 2 naming it, as `sign` (cli_review.rs).
    let req = b"GET /a`b HTTP/1.1\r\nHost: h\r\n\r\n";
    assert_exit2(
        &verify_at(&keys, req, CREATED, &[]),
        "invalid request target",
    );
    assert_exit2(&sign_with(&keys, req, &[]), "invalid request target");
    // The same with a body over `--max-body-bytes` (a review's repro): exit 2 too, not a
    // `body_too_large` verdict (exit 1) on a request that could not be read.
    for req in [
        &b"POST /a`b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"[..],
        &b"POST /x#frag HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"[..],
    ] {
        let out = verify_at(&keys, req, CREATED, &["--max-body-bytes", "1"]);
        assert_exit2(&out, "request target");
    }
}

/// A fragment is never sent in a request target (RFC 9112 §3.2); `http::Uri` drops it, so `sign`
/// signed `/x` and wrote `/x#frag` back. Refused: `sign` and `verify` exit 2 naming it and
/// write nothing (a request that cannot be read), also for a signed request whose target
/// gained one on the way.
#[test]
fn a_request_target_with_a_fragment_is_refused() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    for target in ["/x#frag", "/x?a=1#", "http://h/x#f"] {
        let req = format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n");
        let out = sign_with(&keys, req.as_bytes(), &[]);
        assert_exit2(&out, "has a fragment");
        assert!(out.stderr.contains("stdin"), "{}", out.stderr);
        let out = verify_at(&keys, req.as_bytes(), CREATED, &[]);
        assert_exit2(&out, "has a fragment");
    }
    let signed = sign_with(&keys, b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n", &[]);
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    assert_eq!(verify_at(&keys, &signed.stdout, CREATED, &[]).code, 0);
    let with_fragment = [b"GET /x#f".as_slice(), &signed.stdout[b"GET /x".len()..]].concat();
    let out = verify_at(&keys, &with_fragment, CREATED, &[]);
    assert_exit2(&out, "has a fragment");
}

// ---- a real server on loopback accepts what `sign` writes ----

#[tokio::test]
async fn signed_output_is_accepted_by_a_hyper_server() {
    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let created = now.to_string();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let keyring = countersign::keyfile::load_keyring(Path::new(&keys)).unwrap();
    let verifier = countersign::Verifier::new(
        countersign::KeyringHandle::new(keyring),
        countersign::Policy::default(),
    );
    let server = tokio::spawn(async move {
        for _ in 0..4 {
            let (stream, _) = listener.accept().await.unwrap();
            let verifier = verifier.clone();
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let verifier = verifier.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_secs();
                        let answer = match verifier.verify(&parts, &body, now) {
                            Ok(v) => {
                                format!("ok {}", v.identity.map(|i| i.user).unwrap_or_default())
                            }
                            Err(e) => format!("rejected {}", e.reason()),
                        };
                        Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(answer),
                        )))
                    }
                });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
                .unwrap();
        }
    });

    async fn send(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }
    // The body with Content-Length, and chunked (hyper decodes the chunks; the digest covers
    // the content). `tamper_at` is the offset from the end of the byte changed: the body's last
    // byte, in each framing.
    for (framing, body, tamper_at) in [
        ("Content-Length: 11", "hello world", 1),
        (
            "Transfer-Encoding: chunked",
            "6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n",
            8,
        ),
    ] {
        let request = format!(
            "POST /v1/things?limit=5 HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             {framing}\r\n\r\n{body}"
        );
        let (keys, created) = (keys.clone(), created.clone());
        let signed = tokio::task::spawn_blocking(move || {
            run(
                &[
                    "sign",
                    "--keyring",
                    &keys,
                    "--created",
                    &created,
                    "--user",
                    "Zoë",
                ],
                request.as_bytes(),
            )
        })
        .await
        .unwrap();
        assert_eq!(signed.code, 0, "{}", signed.stderr);

        let accepted = send(addr, &signed.stdout).await;
        assert!(
            accepted.starts_with("HTTP/1.1 200"),
            "{framing}: {accepted}"
        );
        assert!(accepted.ends_with("ok Zoë"), "{framing}: {accepted}");

        let mut tampered = signed.stdout.clone();
        let at = tampered.len() - tamper_at;
        assert_eq!(tampered[at], b'd', "{framing}");
        tampered[at] = b'D';
        let rejected = send(addr, &tampered).await;
        assert!(
            rejected.ends_with("rejected digest_mismatch"),
            "{framing}: {rejected}"
        );
    }
    server.await.unwrap();
}

/// A review's repro: a proxy configured with `signing.user_header = "x-user"` signs its
/// user's field under that name, and `verify` (which read only `x-auth-user`) printed
/// `"user":null` for it, exit 0, as if the request were anonymous; `sign` could write only
/// `X-Auth-User`. `--user-header` / `--roles-header` now name the fields on both, checked by
/// the rules of the config's keys (exit 2 otherwise).
#[test]
fn identity_fields_under_the_names_a_proxy_is_configured_with() {
    let dir = temp_dir();
    let keys = keyring_with(&dir, "k1", SECRET_A);
    let names = ["--user-header", "X-User", "--roles-header", "x-roles"];
    let mut extra = vec!["--user", "alice", "--roles", "admin,ops"];
    extra.extend_from_slice(&names);
    let signed = sign_with(&keys, REQUEST, &extra);
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let text = signed.stdout_str().to_ascii_lowercase();
    assert!(text.contains("\r\nx-user: alice\r\n"), "{text}");
    assert!(text.contains("\r\nx-roles: admin,ops\r\n"), "{text}");
    assert!(!text.contains("x-auth-user"), "{text}");
    assert!(text.contains(r#""x-user" "x-roles")"#), "{text}");
    // Read under the same names: the user and roles.
    let out = verify_at(&keys, &signed.stdout, CREATED, &names);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        out.stdout_str(),
        "{\"valid\":true,\"user\":\"alice\",\"roles\":[\"admin\",\"ops\"],\"keyid\":\"k1\"}\n"
    );
    // Under the default names the fields are extra covered headers: valid, no user.
    let out = verify_at(&keys, &signed.stdout, CREATED, &[]);
    assert_eq!(
        out.stdout_str(),
        "{\"valid\":true,\"user\":null,\"roles\":[],\"keyid\":\"k1\"}\n"
    );
    // Names the config refuses are refused here too, and so are two equal names.
    for (flag, name, problem) in [
        ("--user-header", "host", "cannot be used here"),
        ("--user-header", "x_user", "holds a `_`"),
        ("--roles-header", "@path", "derived component"),
        ("--roles-header", "signature", "cannot be used here"),
        ("--user-header", "bad name", "not a valid header name"),
        (
            "--roles-header",
            "x-auth-user",
            "must differ from --user-header",
        ),
    ] {
        assert_exit2(&sign_with(&keys, REQUEST, &[flag, name]), problem);
        assert_exit2(
            &verify_at(&keys, &signed.stdout, CREATED, &[flag, name]),
            problem,
        );
    }
}

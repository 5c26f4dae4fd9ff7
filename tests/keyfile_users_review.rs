//! Adversarial review of the keyring loader (`src/keyfile.rs`) and the users file
//! (`src/proxy/users.rs`): each test is a defect found, shown on the real binary
//! (`check-config`, `sign`, `verify`) before it was fixed.
//! Run: `cargo test --all-features --test keyfile_users_review`.
#![cfg(feature = "proxy")]

mod support;
mod support_cli;
mod support_run;

use std::path::{Path, PathBuf};

use support::*;
use support_cli::{check_config, Checked};
use support_run::config_text;

/// `proxy.toml`, a working `keys.toml` and `users_text` as `users.toml` in a fresh folder;
/// returns the folder and the config path.
fn config_with_users(tag: &str, users_text: &str) -> (TestDir, PathBuf) {
    let dir = temp_dir(tag);
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), users_text);
    let config = dir.join("proxy.toml");
    write(
        &config,
        &config_text("127.0.0.1:18080", None, "http://127.0.0.1:3000"),
    );
    (dir, config)
}

fn checked(config: &Path) -> Checked {
    Checked::from(check_config(config))
}

/// A users file of one user `alice` with `hash`.
fn one_user(hash: &str) -> String {
    format!("[[users]]\nname = \"alice\"\npassword = \"{hash}\"\n")
}

/// `hash` (a PHC string) with its salt field replaced by `salt` (B64, as in PHC strings).
fn with_salt(hash: &str, salt: &str) -> String {
    let mut fields: Vec<&str> = hash.split('$').collect();
    let at = fields.len() - 2;
    fields[at] = salt;
    fields.join("$")
}

/// `countersign sign --keyring <keyring>` of a plain `GET /x` with a fixed nonce.
fn sign_get(keyring: &str) -> support_cli::Run {
    support_cli::run(
        &[
            "sign",
            "--keyring",
            keyring,
            "--nonce",
            "bm9uY2Vub25jZW5vbmNlbm9uY2U",
        ],
        b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
    )
}

/// An argon2id PHC string that parses, and whose parameters are in bounds, but that no
/// password can ever match: its salt is shorter than argon2's 8 bytes, or not decodable, or its
/// version is one argon2 does not define. The users file documents "checked when the file
/// loads (a typo'd hash is a config error, not a user who can never log in)"; such a hash was
/// accepted by `check-config` (and start, and reload), and the user could never log in (and
/// that name's failed logins answered at once, without the argon2 work an unknown name costs).
#[test]
fn users_file_hashes_that_can_never_verify_are_refused_when_the_file_loads() {
    let good = cheap_hash(ALICE_PASSWORD);
    // The good hash itself is accepted (16-byte salt).
    let (_dir, config) = config_with_users("review-hash-good", &one_user(&good));
    let out = checked(&config);
    assert_eq!(out.code, Some(0), "{out}");
    // 8 bytes of salt (argon2's minimum) is accepted too.
    let (_dir, config) =
        config_with_users("review-hash-8", &one_user(&with_salt(&good, "c2FsdHNhbHQ")));
    let out = checked(&config);
    assert_eq!(out.code, Some(0), "{out}");

    for (what, hash, problem) in [
        // "salt" and "saltsal": 4 and 7 bytes.
        ("4-byte salt", with_salt(&good, "c2FsdA"), "salt"),
        ("7-byte salt", with_salt(&good, "c2FsdHNhbA"), "salt"),
        // 5 B64 characters decode to no whole number of bytes.
        ("undecodable salt", with_salt(&good, "c2Fsd"), "salt"),
        (
            "unknown version",
            good.replacen("$v=19$", "$v=20$", 1),
            "version",
        ),
    ] {
        let (_dir, config) = config_with_users("review-hash-bad", &one_user(&hash));
        let out = checked(&config);
        assert_eq!(out.code, Some(2), "{what} accepted: {out}");
        assert!(
            out.stderr.contains("users.toml")
                && out.stderr.contains("users[0].password")
                && out.stderr.contains("\"alice\"")
                && out.stderr.contains(problem),
            "{what}: the message names the file, the key, the user and the problem: {out}"
        );
    }
}

/// Two users whose names are the same text in Unicode's eyes (canonically equivalent: `josé`
/// with a precomposed `é`, and `jose` followed by a combining acute accent) but not byte for
/// byte were accepted as two accounts. They look the same in the file, in every log line and in
/// the signed identity an API receives, and an API that normalises names (as most text
/// comparisons in databases and languages do) takes them for one user: whoever holds either
/// password acts as the other. Names still compare exactly (`Bob` and `bob` are two users, as
/// documented); only names that differ in nothing but their Unicode encoding are refused.
#[test]
fn users_whose_names_differ_only_in_unicode_normalisation_are_refused() {
    let hash = cheap_hash(ALICE_PASSWORD);
    let user = |name: &str, roles: &str| {
        format!("[[users]]\nname = \"{name}\"\npassword = \"{hash}\"\nroles = [{roles}]\n")
    };
    // Case differs: two users, as documented.
    let (_dir, config) = config_with_users(
        "review-names-case",
        &format!("{}{}", user("Jose", "\"admin\""), user("jose", "")),
    );
    let out = checked(&config);
    assert_eq!(out.code, Some(0), "{out}");

    let composed = "jos\u{e9}";
    let decomposed = "jose\u{301}";
    let (_dir, config) = config_with_users(
        "review-names-nfc",
        &format!("{}{}", user(composed, "\"admin\""), user(decomposed, "")),
    );
    let out = checked(&config);
    assert_eq!(
        out.code,
        Some(2),
        "canonically equivalent names accepted: {out}"
    );
    assert!(
        out.stderr.contains("users.toml")
            && out.stderr.contains("users[1].name")
            && out.stderr.contains("users[0]"),
        "the message names the file, both entries: {out}"
    );
}

/// A keyring file in `dir`; its path as text, for the CLI's arguments.
fn keyring_at(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    write(&path, text);
    path.display().to_string()
}

/// 32 bytes 0x00..0x1f, base64.
const SECRET_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// 32 bytes of 0x42, base64.
const SECRET_B: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";

/// `retired = true` is documented as "listed, no longer accepted", and retiring a key is how a
/// leaked key is shut out (docs/OPERATIONS.md, "Key rotation"). A keyring where the retired
/// key's secret is also the secret of a key still accepted (the new key's `secret` pasted from
/// the old one, the same `secret_file` named twice) loaded silently, and whoever holds the
/// "retired" secret still signs requests every verifier accepts, under the other key's id
/// (ids are not secret: every signed request carries its keyid). Such a keyring is refused,
/// naming both keys.
#[test]
fn a_retired_keys_secret_still_accepted_under_another_id_is_refused() {
    let dir = temp_dir("review-retired-secret");
    // The old key k1 leaked; the operator "rotates" to k2, but k2 got k1's secret.
    let rotated = keyring_at(
        &dir,
        "rotated.toml",
        &format!(
            "active = \"k2\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\nretired = true\n\
             [[keys]]\nid = \"k2\"\nsecret_file = \"k2.secret\"\n"
        ),
    );
    write(&dir.join("k2.secret"), &format!("{SECRET_A}\n"));
    // Whoever holds the leaked secret signs as k2.
    let leaked = keyring_at(
        &dir,
        "leaked.toml",
        &format!("active = \"k2\"\n[[keys]]\nid = \"k2\"\nsecret = \"{SECRET_A}\"\n"),
    );
    let request = b"GET /api/x HTTP/1.1\r\nHost: api.test\r\n\r\n";
    let signed = support_cli::run(
        &[
            "sign",
            "--keyring",
            &leaked,
            "--created",
            "1800000000",
            "--nonce",
            "bm9uY2Vub25jZW5vbmNlbm9uY2U",
        ],
        request,
    );
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let verified = support_cli::run(
        &["verify", "--keyring", &rotated, "--now", "1800000001"],
        signed.stdout.as_bytes(),
    );
    assert_ne!(
        verified.code, 0,
        "a request signed with the retired key's secret is accepted: {}",
        verified.stdout
    );
    assert_eq!(verified.code, 2, "{}{}", verified.stdout, verified.stderr);
    for part in ["rotated.toml", "keys[1].secret_file", "keys[0]", "retired"] {
        assert!(
            verified.stderr.contains(part),
            "{part:?} missing: {}",
            verified.stderr
        );
    }
    assert!(!verified.stderr.contains(SECRET_A), "{}", verified.stderr);

    // Two accepted keys may share a secret (k1 renamed k2 without a new secret), and a retired
    // key with a secret of its own is what retiring is.
    let renamed = keyring_at(
        &dir,
        "renamed.toml",
        &format!(
            "active = \"k2\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n\
             [[keys]]\nid = \"k2\"\nsecret = \"{SECRET_A}\"\n\
             [[keys]]\nid = \"old\"\nsecret = \"{SECRET_B}\"\nretired = true\n"
        ),
    );
    let verified = support_cli::run(
        &["verify", "--keyring", &renamed, "--now", "1800000001"],
        signed.stdout.as_bytes(),
    );
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
}

/// The keyring loader never quotes a secret (src/keyfile.rs), and guards `secret_env` and
/// `secret_file` against a secret pasted there. A secret pasted into `active` (the clipboard
/// holds the new key's secret while `active` is pointed at it), into a key's `id`, or into
/// `rotation` was quoted back in full: on stderr, and on SIGHUP in the proxy's log.
#[test]
fn a_secret_pasted_into_active_id_or_rotation_is_not_quoted() {
    let dir = temp_dir("review-pasted-secret");
    let cases = [
        (
            "active.toml",
            format!("active = \"{SECRET_A}\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_B}\"\n"),
            "active",
        ),
        (
            "id.toml",
            format!(
                "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_B}\"\n\
                 [[keys]]\nid = \"{SECRET_A}\"\nsecret = \"{SECRET_B}\"\nretired = true\n\
                 [[keys]]\nid = \"{SECRET_A}\"\nsecret = \"{SECRET_B}\"\n"
            ),
            "keys[2].id",
        ),
        (
            "listed.toml",
            format!("active = \"k1\"\n[[keys]]\nid = \"{SECRET_A}\"\nsecret = \"{SECRET_B}\"\n"),
            "active",
        ),
        (
            "rotation.toml",
            format!(
                "active = \"k1\"\nrotation = \"{SECRET_A}\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_B}\"\n"
            ),
            "rotation",
        ),
        (
            "key-rotation.toml",
            format!(
                "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_B}\"\nrotation = \"{SECRET_A}\"\n"
            ),
            "keys[0].rotation",
        ),
    ];
    for (name, text, key) in cases {
        let path = keyring_at(&dir, name, &text);
        let out = sign_get(&path);
        assert_eq!(out.code, 2, "{name} was accepted: {}", out.stderr);
        assert!(
            out.stderr.contains(name) && out.stderr.contains(key),
            "{name}: names the file and {key}: {}",
            out.stderr
        );
        for form in [SECRET_A, SECRET_A.trim_end_matches('=')] {
            assert!(
                !out.stderr.contains(form),
                "{name}: the secret is quoted: {}",
                out.stderr
            );
        }
    }
    // An ordinary id is still quoted: it is what the operator needs to see.
    let path = keyring_at(
        &dir,
        "plain.toml",
        &format!("active = \"k9\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_B}\"\n"),
    );
    let out = support_cli::run(&["sign", "--keyring", &path], b"GET /x HTTP/1.1\r\n\r\n");
    assert!(
        out.stderr
            .contains("active key \"k9\" is not listed (listed: k1)"),
        "{}",
        out.stderr
    );
}

/// A 64-byte secret (HMAC-SHA256's block size, a common choice) made as CONFIG.md shows for 32
/// bytes, `head -c 64 /dev/urandom | base64 > k1`, is written over two lines: `base64` wraps
/// its output at 76 columns. The loader then said only "is not valid base64 (standard
/// alphabet ...)", which the operator can see is not so; the message says what is wrong (split
/// over lines) and how to write it (`base64 -w0`), still without quoting it.
#[test]
fn a_secret_wrapped_over_lines_by_base64_is_named_as_such() {
    use base64::Engine as _;
    let dir = temp_dir("review-wrapped-secret");
    let secret: Vec<u8> = (0u8..64)
        .map(|b| b.wrapping_mul(37).wrapping_add(11))
        .collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&secret);
    // As GNU `base64` writes it: 76 columns, then the rest, each line ended.
    let wrapped = format!("{}\n{}\n", &encoded[..76], &encoded[76..]);
    write(&dir.join("k1"), &wrapped);
    let keyring = keyring_at(
        &dir,
        "keys.toml",
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_file = \"k1\"\n",
    );
    let out = sign_get(&keyring);
    assert_eq!(out.code, 2, "{}", out.stderr);
    for part in ["keys[0].secret_file", "several lines", "base64 -w0"] {
        assert!(
            out.stderr.contains(part),
            "{part:?} missing: {}",
            out.stderr
        );
    }
    for form in [&encoded[..76], &encoded[76..]] {
        assert!(!out.stderr.contains(form), "quoted: {}", out.stderr);
    }
    // Inline, the same (a TOML multi-line string holds it as written).
    let inline = keyring_at(
        &dir,
        "inline.toml",
        &format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"\"\"{wrapped}\"\"\"\n"),
    );
    let out = sign_get(&inline);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("keys[0].secret") && out.stderr.contains("several lines"),
        "{}",
        out.stderr
    );
    // Garbage stays "not valid base64".
    write(&dir.join("k1"), "%%% not base64 %%%\nmore\n");
    let out = sign_get(&keyring);
    assert!(
        out.stderr.contains("not valid base64") && !out.stderr.contains("several lines"),
        "{}",
        out.stderr
    );
}

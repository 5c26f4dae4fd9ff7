//! Keyring files: every accepted way to give a secret, rotation, and every rejection naming the
//! file, the key path and the problem (without ever quoting a secret).
#![cfg(feature = "keyfile")]

mod support_tmp;

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use countersign::core::{
    Identity, KeyringHandle, Nonce, Policy, Rotation, Signer, SignerConfig, Verifier,
};
use countersign::keyfile::{
    keygen_entry, load_keyring, parse_duration, parse_keyring, KeyfileError, KeyfileErrorKind,
};
use support_tmp::TestDir;

/// 32 bytes 0x00..0x1f, base64.
const SECRET_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
/// 32 bytes of 0x42.
const SECRET_B: &str = "QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";
/// 16 bytes: too short.
const SECRET_SHORT: &str = "AAECAwQFBgcICQoLDA0ODw==";

/// A fresh folder under the system temp dir, removed when dropped.
fn temp_dir() -> TestDir {
    TestDir::new("keyfile")
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn origin() -> &'static Path {
    Path::new("/etc/countersign/keys.toml")
}

fn parse_err(text: &str) -> KeyfileError {
    parse_keyring(text, origin()).expect_err("must be rejected")
}

/// Asserts the error names the file, the key and the problem, and leaks no secret text.
fn assert_names(err: &KeyfileError, kind: KeyfileErrorKind, key: Option<&str>, problem_part: &str) {
    let shown = err.to_string();
    assert_eq!(err.kind(), kind, "{shown}");
    assert_eq!(err.key(), key, "{shown}");
    assert!(
        shown.contains("/etc/countersign/keys.toml")
            || shown.contains(&err.file().display().to_string()),
        "{shown}"
    );
    if let Some(key) = key {
        assert!(shown.contains(key), "{shown}");
    }
    assert!(
        shown.contains(problem_part),
        "{shown:?} should mention {problem_part:?}"
    );
    for secret in [SECRET_A, SECRET_B, SECRET_SHORT] {
        assert!(
            !shown.contains(secret),
            "error text leaks a secret: {shown}"
        );
    }
}

/// Signs with one keyring and verifies with the other: proves both hold the same key bytes.
fn same_key(signing: countersign::Keyring, verifying: countersign::Keyring) -> bool {
    let signer = Signer::new(KeyringHandle::new(signing), SignerConfig::default());
    let verifier = Verifier::new(KeyringHandle::new(verifying), Policy::default());
    let (mut parts, ()) = http::Request::post("/x")
        .header("host", "api.test")
        .body(())
        .unwrap()
        .into_parts();
    signer
        .sign(
            &mut parts,
            b"body",
            Some(&Identity::new("u", ["r"])),
            1_000,
            &Nonce::random(),
        )
        .unwrap();
    verifier.verify(&parts, b"body", 1_001).is_ok()
}

#[test]
fn inline_secret_loads_and_signs() {
    let text = format!(
        "active = \"k1\"\nrotation = \"off\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n"
    );
    let keyring = parse_keyring(&text, origin()).unwrap();
    assert_eq!(keyring.active_id(), "k1");
    assert_eq!(keyring.rotation(), Rotation::Off);
    let debug = format!("{keyring:?}");
    assert!(
        !debug.contains(SECRET_A) && !debug.contains("0, 1, 2, 3"),
        "{debug}"
    );
    let again = parse_keyring(&text, origin()).unwrap();
    assert!(same_key(keyring, again));
}

#[test]
fn secret_file_resolves_against_the_keyring_folder_and_is_trimmed() {
    let dir = temp_dir();
    std::fs::create_dir_all(dir.join("secrets")).unwrap();
    write(&dir, "secrets/k1.b64", &format!("\n  {SECRET_A}\n\n"));
    let path = write(
        &dir,
        "keys.toml",
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_file = \"secrets/k1.b64\"\n",
    );
    let from_file = load_keyring(&path).unwrap();
    let inline = parse_keyring(
        &format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n"),
        origin(),
    )
    .unwrap();
    assert!(same_key(from_file, inline));

    // Absolute paths are taken as they are.
    let abs = dir.join("secrets/k1.b64");
    let text = format!(
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_file = {:?}\n",
        abs.display().to_string()
    );
    assert!(parse_keyring(&text, Path::new("/nonexistent/keys.toml")).is_ok());
}

#[test]
fn secret_env_reads_the_variable() {
    std::env::set_var("COUNTERSIGN_TEST_SECRET_ENV_OK", SECRET_B);
    let text =
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_env = \"COUNTERSIGN_TEST_SECRET_ENV_OK\"\n";
    let from_env = parse_keyring(text, origin()).unwrap();
    let inline = parse_keyring(
        &format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_B}\"\n"),
        origin(),
    )
    .unwrap();
    let other = parse_keyring(
        &format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n"),
        origin(),
    )
    .unwrap();
    assert!(same_key(from_env, inline));
    let from_env = parse_keyring(text, origin()).unwrap();
    assert!(
        !same_key(from_env, other),
        "different secrets must not verify each other"
    );
}

#[test]
fn unpadded_base64_is_accepted() {
    let unpadded = SECRET_A.trim_end_matches('=');
    let text = format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{unpadded}\"\n");
    let a = parse_keyring(&text, origin()).unwrap();
    let b = parse_keyring(
        &format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n"),
        origin(),
    )
    .unwrap();
    assert!(same_key(a, b));
}

#[test]
fn rotation_parses_and_rotated_keyids_verify() {
    let text = format!(
        "active = \"k1\"\nrotation = \"6h\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n"
    );
    let keyring = parse_keyring(&text, origin()).unwrap();
    assert_eq!(
        keyring.rotation(),
        Rotation::Every(Duration::from_secs(6 * 3600))
    );
    let key = keyring.signing_key(6 * 3600 * 5 + 7);
    assert_eq!(&*key.keyid, "k1.5");
    assert!(same_key(keyring, parse_keyring(&text, origin()).unwrap()));

    let no_rotation_line =
        format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n");
    assert_eq!(
        parse_keyring(&no_rotation_line, origin())
            .unwrap()
            .rotation(),
        Rotation::Off
    );
    for (text, secs) in [("30m", 1800), ("1d", 86_400), ("10s", 10)] {
        let t = format!("active = \"k1\"\nrotation = \"{text}\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n");
        assert_eq!(
            parse_keyring(&t, origin()).unwrap().rotation(),
            Rotation::Every(Duration::from_secs(secs))
        );
    }
}

#[test]
fn retired_keys_are_listed_but_do_not_verify() {
    let text = format!(
        "active = \"new\"\n[[keys]]\nid = \"old\"\nsecret = \"{SECRET_A}\"\nretired = true\n[[keys]]\nid = \"new\"\nsecret = \"{SECRET_B}\"\n"
    );
    let keyring = parse_keyring(&text, origin()).unwrap();
    assert!(keyring.verification_key("old", 0).is_none());
    assert!(keyring.verification_key("new", 0).is_some());
}

#[test]
fn parse_duration_units() {
    assert_eq!(parse_duration("off").unwrap(), None);
    assert_eq!(
        parse_duration("10s").unwrap(),
        Some(Duration::from_secs(10))
    );
    assert_eq!(
        parse_duration("6h").unwrap(),
        Some(Duration::from_secs(21_600))
    );
    assert_eq!(
        parse_duration("30m").unwrap(),
        Some(Duration::from_secs(1_800))
    );
    assert_eq!(
        parse_duration("1d").unwrap(),
        Some(Duration::from_secs(86_400))
    );
    assert_eq!(
        parse_duration("500ms").unwrap(),
        Some(Duration::from_millis(500))
    );
    let err = parse_duration("6 hours").unwrap_err();
    assert!(err.to_string().contains("\"6 hours\""), "{err}");
    for bad in [
        "",
        "h",
        "6",
        "6x",
        "-6h",
        "1.5h",
        "6H",
        "on",
        "99999999999999999999999d",
    ] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn keygen_entry_is_a_keyring_and_its_table_appends() {
    let entry = keygen_entry("k2");
    assert!(entry.contains("active = \"k2\""), "{entry}");
    let keyring = parse_keyring(&entry, origin()).unwrap();
    assert_eq!(keyring.active_id(), "k2");
    assert_eq!(keyring.rotation(), Rotation::Off);
    assert!(keyring.verification_key("k2", 0).is_some());

    // Its [[keys]] table, appended to an existing keyring, adds a second, verifying key.
    let table = &entry[entry.find("\n[[keys]]\n").unwrap() + 1..];
    let existing = format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n");
    let both = parse_keyring(&format!("{existing}{table}"), origin()).unwrap();
    assert_eq!(both.active_id(), "k1");
    assert!(both.verification_key("k2", 0).is_some());

    // Fresh randomness each time: 32 bytes.
    let secret_of = |e: &str| {
        let line = e
            .lines()
            .find(|l| l.starts_with("secret = "))
            .unwrap()
            .to_owned();
        line.trim_start_matches("secret = ")
            .trim_matches('"')
            .to_owned()
    };
    let a = secret_of(&entry);
    let b = secret_of(&keygen_entry("k2"));
    assert_ne!(a, b);
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&a)
            .unwrap()
            .len(),
        32
    );

    // An id that needs escaping stays one TOML string.
    let odd = keygen_entry("k#1");
    assert_eq!(parse_keyring(&odd, origin()).unwrap().active_id(), "k#1");
}

// ---- rejections: each names the file, the key and the problem ----

#[test]
fn unreadable_file() {
    let dir = temp_dir();
    let missing = dir.join("missing.toml");
    let err = load_keyring(&missing).unwrap_err();
    assert_eq!(err.kind(), KeyfileErrorKind::Unreadable);
    assert_eq!(err.file(), missing.as_path());
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
    assert!(err.to_string().contains("cannot read"), "{err}");

    let err = load_keyring(&dir).unwrap_err();
    assert_eq!(err.kind(), KeyfileErrorKind::Unreadable, "{err}");
}

#[test]
fn oversized_file_is_refused() {
    let dir = temp_dir();
    let big = "# padding\n".repeat(120_000);
    let path = write(&dir, "big.toml", &big);
    let err = load_keyring(&path).unwrap_err();
    assert_eq!(err.kind(), KeyfileErrorKind::Unreadable);
    assert!(err.to_string().contains("larger than"), "{err}");
    // A large binary file is "larger than", not "not UTF-8 text" (it was read to the limit and
    // decoded first).
    let path = dir.join("big.bin");
    std::fs::write(&path, vec![0xff_u8; 1024 * 1024 + 7]).unwrap();
    let err = load_keyring(&path).unwrap_err();
    assert!(
        err.to_string().contains("larger than 1048576 bytes"),
        "{err}"
    );
}

#[test]
fn bad_toml_names_the_line_without_quoting_it() {
    let text =
        format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\" trailing\n");
    let err = parse_err(&text);
    assert_names(&err, KeyfileErrorKind::Syntax, None, "line 4");
}

#[test]
fn unknown_field_is_named_with_its_path() {
    let text = format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n[[keys]]\nid = \"k2\"\nsecert = \"{SECRET_B}\"\n");
    let err = parse_err(&text);
    assert_eq!(err.kind(), KeyfileErrorKind::Syntax);
    let shown = err.to_string();
    assert!(shown.contains("keys[1]"), "{shown}");
    assert!(shown.contains("secert"), "{shown}");
    assert!(!shown.contains(SECRET_B), "{shown}");

    let err = parse_err(&format!(
        "active = \"k1\"\nrotate = \"6h\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n"
    ));
    assert!(err.to_string().contains("rotate"), "{err}");
}

#[test]
fn wrong_type_is_named_with_its_path() {
    let err = parse_err(&format!(
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\nretired = \"yes\"\n"
    ));
    assert_eq!(err.kind(), KeyfileErrorKind::Syntax);
    assert_eq!(err.key(), Some("keys[0].retired"), "{err}");
}

#[test]
fn missing_active_is_named() {
    let err = parse_err(&format!("[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n"));
    assert_eq!(err.kind(), KeyfileErrorKind::Syntax);
    assert!(err.to_string().contains("active"), "{err}");
}

#[test]
fn bad_base64() {
    let text = format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n[[keys]]\nid = \"k2\"\nsecret = \"not base64!!\"\n");
    assert_names(
        &parse_err(&text),
        KeyfileErrorKind::BadBase64,
        Some("keys[1].secret"),
        "not valid base64",
    );
}

#[test]
fn short_secret() {
    let text = format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n[[keys]]\nid = \"k2\"\nsecret = \"{SECRET_SHORT}\"\n");
    assert_names(
        &parse_err(&text),
        KeyfileErrorKind::ShortSecret,
        Some("keys[1].secret"),
        "16 bytes, at least 32",
    );
}

#[test]
fn short_secret_in_secret_file() {
    let dir = temp_dir();
    write(&dir, "short.b64", SECRET_SHORT);
    let path = write(
        &dir,
        "keys.toml",
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_file = \"short.b64\"\n",
    );
    let err = load_keyring(&path).unwrap_err();
    assert_eq!(err.kind(), KeyfileErrorKind::ShortSecret);
    assert_eq!(err.key(), Some("keys[0].secret_file"));
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn missing_secret_file() {
    let dir = temp_dir();
    let path = write(
        &dir,
        "keys.toml",
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_file = \"nope.b64\"\n",
    );
    let err = load_keyring(&path).unwrap_err();
    assert_eq!(err.kind(), KeyfileErrorKind::Unreadable);
    assert_eq!(err.key(), Some("keys[0].secret_file"));
    assert!(
        err.to_string()
            .contains(&dir.join("nope.b64").display().to_string()),
        "{err}"
    );
}

#[test]
fn secret_file_with_garbage() {
    let dir = temp_dir();
    write(&dir, "bad.b64", "%%% not base64 %%%");
    let path = write(
        &dir,
        "keys.toml",
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_file = \"bad.b64\"\n",
    );
    let err = load_keyring(&path).unwrap_err();
    assert_eq!(err.kind(), KeyfileErrorKind::BadBase64);
    assert_eq!(err.key(), Some("keys[0].secret_file"));
}

#[test]
fn unset_secret_env() {
    let text = "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_env = \"COUNTERSIGN_TEST_DEFINITELY_UNSET_VAR\"\n";
    assert_names(
        &parse_err(text),
        KeyfileErrorKind::MissingEnv,
        Some("keys[0].secret_env"),
        "COUNTERSIGN_TEST_DEFINITELY_UNSET_VAR\" is not set",
    );
}

#[test]
fn secret_env_with_short_value() {
    std::env::set_var("COUNTERSIGN_TEST_SECRET_ENV_SHORT", SECRET_SHORT);
    let text = "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret_env = \"COUNTERSIGN_TEST_SECRET_ENV_SHORT\"\n";
    assert_names(
        &parse_err(text),
        KeyfileErrorKind::ShortSecret,
        Some("keys[0].secret_env"),
        "16 bytes",
    );
}

#[test]
fn exactly_one_secret_source() {
    let both = format!(
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\nsecret_file = \"x\"\n"
    );
    assert_names(
        &parse_err(&both),
        KeyfileErrorKind::SecretSource,
        Some("keys[0]"),
        "found secret, secret_file",
    );
    let none = "active = \"k1\"\n[[keys]]\nid = \"k1\"\n";
    assert_names(
        &parse_err(none),
        KeyfileErrorKind::SecretSource,
        Some("keys[0]"),
        "no secret",
    );
}

#[test]
fn unknown_active_key() {
    let text = format!("active = \"k9\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n");
    assert_names(
        &parse_err(&text),
        KeyfileErrorKind::UnknownActive,
        Some("active"),
        "\"k9\" is not listed",
    );
}

#[test]
fn retired_active_key() {
    let text = format!(
        "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\nretired = true\n"
    );
    assert_names(
        &parse_err(&text),
        KeyfileErrorKind::UnknownActive,
        Some("active"),
        "retired",
    );
}

#[test]
fn duplicate_id() {
    let text = format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_B}\"\n");
    assert_names(
        &parse_err(&text),
        KeyfileErrorKind::DuplicateId,
        Some("keys[1].id"),
        "also keys[0].id",
    );
}

#[test]
fn bad_ids() {
    let quote = format!("active = 'a\"b'\n[[keys]]\nid = 'a\"b'\nsecret = \"{SECRET_A}\"\n");
    assert_names(
        &parse_err(&quote),
        KeyfileErrorKind::BadId,
        Some("keys[0].id"),
        "visible ASCII",
    );
    // A space is not a key id character either (what `countersign keygen --id` refuses too).
    let spaced = format!("active = 'a b'\n[[keys]]\nid = 'a b'\nsecret = \"{SECRET_A}\"\n");
    assert_names(
        &parse_err(&spaced),
        KeyfileErrorKind::BadId,
        Some("keys[0].id"),
        "no space",
    );
    let dotted = format!(
        "active = \"k.1\"\nrotation = \"1h\"\n[[keys]]\nid = \"k.1\"\nsecret = \"{SECRET_A}\"\n"
    );
    assert_names(
        &parse_err(&dotted),
        KeyfileErrorKind::BadId,
        Some("keys[0].id"),
        "must not contain '.'",
    );
}

#[test]
fn bad_duration() {
    let text = format!(
        "active = \"k1\"\nrotation = \"6 hours\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n"
    );
    assert_names(
        &parse_err(&text),
        KeyfileErrorKind::BadDuration,
        Some("rotation"),
        "not a duration",
    );
    let sub_second = format!(
        "active = \"k1\"\nrotation = \"500ms\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n"
    );
    assert_names(
        &parse_err(&sub_second),
        KeyfileErrorKind::BadDuration,
        Some("rotation"),
        "at least 1s",
    );
    // At most a year (a period of 213503982334601 days would never rotate).
    for (period, ok) in [("365d", true), ("366d", false), ("213503982334601d", false)] {
        let text = format!(
            "active = \"k1\"\nrotation = \"{period}\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n"
        );
        if ok {
            assert!(parse_keyring(&text, origin()).is_ok(), "{period}");
        } else {
            assert_names(
                &parse_err(&text),
                KeyfileErrorKind::BadDuration,
                Some("rotation"),
                "maximum of 365d",
            );
        }
    }
}

/// `[[keys]] rotation`: a key's own setting overrides the top-level one, a key without it
/// inherits, and a keyring mixing static and rotating keys verifies each in its own form.
#[test]
fn per_key_rotation_overrides_and_inherits() {
    let keyring_with = |active: &str| {
        format!(
            "active = \"{active}\"\nrotation = \"1h\"\n\
             [[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\nrotation = \"off\"\n\
             [[keys]]\nid = \"k2\"\nsecret = \"{SECRET_B}\"\nrotation = \"6h\"\n\
             [[keys]]\nid = \"k3\"\nsecret = \"{SECRET_A}\"\n"
        )
    };
    let keyring = parse_keyring(&keyring_with("k1"), origin()).unwrap();
    assert_eq!(
        keyring.rotation(),
        Rotation::Every(Duration::from_secs(3600))
    );
    assert_eq!(keyring.active_rotation(), Rotation::Off);
    assert_eq!(keyring.key_rotation("k1"), Some(Rotation::Off));
    assert_eq!(
        keyring.key_rotation("k2"),
        Some(Rotation::Every(Duration::from_secs(6 * 3600)))
    );
    assert_eq!(
        keyring.key_rotation("k3"),
        Some(Rotation::Every(Duration::from_secs(3600)))
    );
    let t = 6 * 3600 * 7 + 1;
    assert_eq!(&*keyring.signing_key(t).keyid, "k1");
    for (active, keyid) in [
        ("k1", "k1".to_owned()),
        ("k2", "k2.7".to_owned()),
        ("k3", format!("k3.{}", t / 3600)),
    ] {
        let signer = parse_keyring(&keyring_with(active), origin()).unwrap();
        assert_eq!(&*signer.signing_key(t).keyid, keyid);
        // A verifier whose active key is another one accepts every listed key.
        for verifier_active in ["k1", "k2", "k3"] {
            let signer = parse_keyring(&keyring_with(active), origin()).unwrap();
            let verifier = parse_keyring(&keyring_with(verifier_active), origin()).unwrap();
            assert!(same_key(signer, verifier), "{active} -> {verifier_active}");
        }
    }
    // A key turning rotation on in a keyring that is otherwise off.
    let text = format!(
        "active = \"k2\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n\
         [[keys]]\nid = \"k2\"\nsecret = \"{SECRET_B}\"\nrotation = \"10s\"\n"
    );
    let keyring = parse_keyring(&text, origin()).unwrap();
    assert_eq!(keyring.rotation(), Rotation::Off);
    assert_eq!(&*keyring.signing_key(1234).keyid, "k2.123");
    assert!(keyring.verification_key("k1", 1234).is_some());
    assert!(keyring.verification_key("k2.123", 1234).is_some());
    assert!(keyring.verification_key("k2", 1234).is_none());
}

#[test]
fn bad_per_key_rotation() {
    let with = |rotation: &str| {
        format!(
            "active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET_A}\"\n\
             [[keys]]\nid = \"k2\"\nsecret = \"{SECRET_B}\"\nrotation = \"{rotation}\"\n"
        )
    };
    for (rotation, problem) in [
        ("6 hours", "not a duration"),
        ("500ms", "at least 1s"),
        ("0s", "at least 1s"),
        ("366d", "maximum of 365d"),
    ] {
        assert_names(
            &parse_err(&with(rotation)),
            KeyfileErrorKind::BadDuration,
            Some("keys[1].rotation"),
            problem,
        );
    }
    assert!(parse_keyring(&with("365d"), origin()).is_ok());
    assert!(parse_keyring(&with("off"), origin()).is_ok());
    // Not a string: named with its path, as any wrong type.
    let number = with("1h").replace("rotation = \"1h\"", "rotation = 3600");
    assert_names(
        &parse_err(&number),
        KeyfileErrorKind::Syntax,
        Some("keys[1].rotation"),
        "invalid type",
    );
}

/// Once any key rotates, no id may contain `.` (whether listed before or after the rotating
/// key, retired or not); while none rotates, `.` is allowed.
#[test]
fn dot_rule_with_per_key_rotation() {
    let text = |top: &str, dotted_rotation: &str, other_rotation: &str| {
        format!(
            "active = \"k1\"\n{top}[[keys]]\nid = \"a.b\"\nsecret = \"{SECRET_A}\"\nretired = true\n{dotted_rotation}\
             [[keys]]\nid = \"k1\"\nsecret = \"{SECRET_B}\"\n{other_rotation}"
        )
    };
    assert!(parse_keyring(&text("", "", ""), origin()).is_ok());
    // A rotating default that no key inherits rotates nothing.
    let all_off = text(
        "rotation = \"1h\"\n",
        "rotation = \"off\"\n",
        "rotation = \"off\"\n",
    );
    assert!(parse_keyring(&all_off, origin()).is_ok());
    for (case, by) in [
        (text("", "", "rotation = \"1h\"\n"), "keys[1].rotation"),
        (text("", "rotation = \"1h\"\n", ""), "keys[0].rotation"),
        (
            text("rotation = \"1h\"\n", "rotation = \"off\"\n", ""),
            "rotation, inherited by keys[1]",
        ),
    ] {
        let err = parse_err(&case);
        assert_names(
            &err,
            KeyfileErrorKind::BadId,
            Some("keys[0].id"),
            "must not contain '.'",
        );
        assert!(err.problem().contains(by), "{err}");
    }
}

#[test]
fn no_keys() {
    assert_names(
        &parse_err("active = \"k1\"\n"),
        KeyfileErrorKind::NoKeys,
        Some("keys"),
        "no keys",
    );
}

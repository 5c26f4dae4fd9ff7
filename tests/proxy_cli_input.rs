//! Input checks of the proxy subcommands, through the real binary: `hash-password` takes
//! exactly one line from stdin; `dev` refuses an absolute session timeout shorter than the
//! idle one, as a config file does.
//! Run: `cargo test --all-features --test proxy_cli_input`.
#![cfg(feature = "proxy")]

mod support_cli;

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use support_cli::{exit_within, run_countersign, spawn_countersign, BIN};

fn verifies(hash: &str, password: &[u8]) -> bool {
    use argon2::PasswordVerifier as _;
    let parsed = argon2::PasswordHash::new(hash).unwrap();
    argon2::Argon2::default()
        .verify_password(password, &parsed)
        .is_ok()
}

fn hash_of(stdin: &[u8]) -> String {
    let out = run_countersign(["hash-password"], stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdin:?}: {stderr}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn refused(stdin: &[u8]) -> String {
    let out = run_countersign(["hash-password"], stdin);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stdin:?}: {stderr}");
    assert!(out.stdout.is_empty(), "{stdin:?}: no hash printed");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn hash_password_hashes_one_line_with_or_without_its_line_end() {
    for stdin in [&b"pass word"[..], b"pass word\n", b"pass word\r\n"] {
        let hash = hash_of(stdin);
        assert!(verifies(&hash, b"pass word"), "{stdin:?}");
        if stdin != b"pass word" {
            assert!(
                !verifies(&hash, stdin),
                "{stdin:?}: the line end is not hashed"
            );
        }
    }
    // The longest password, with its line end.
    let mut long = vec![b'x'; 1024];
    long.extend_from_slice(b"\r\n");
    assert!(verifies(&hash_of(&long), &[b'x'; 1024]));
}

#[test]
fn hash_password_refuses_more_than_one_line_instead_of_hashing_part_of_it() {
    for stdin in [
        &b"a\nb"[..],
        b"a\nb\n",
        b"a\n\n",
        b"a\r\n\r\n",
        b"a\n\r\n",
        b"a\rb",
        b"a\r",
        b"\n\n",
    ] {
        let stderr = refused(stdin);
        assert!(stderr.contains("one line"), "{stdin:?}: {stderr}");
    }
}

#[test]
fn hash_password_keeps_its_empty_length_and_utf8_checks() {
    for (stdin, message) in [
        (&b""[..], "empty password"),
        (b"\n", "empty password"),
        (b"\r\n", "empty password"),
        (b"\xff\xfe\n", "not UTF-8"),
    ] {
        let stderr = refused(stdin);
        assert!(stderr.contains(message), "{stdin:?}: {stderr}");
    }
    for len in [1025, 5000] {
        let mut input = vec![b'x'; len];
        input.push(b'\n');
        let stderr = refused(&input);
        assert!(stderr.contains("longer than 1024 bytes"), "{len}: {stderr}");
    }
}

/// `--max-password-bytes` sets the longest password read: a longer one is refused with the
/// flag named, one within it hashed (with a warning when a proxy's default would refuse it at
/// login); values outside 1 to 65536 are usage errors.
#[test]
fn hash_password_max_password_bytes_sets_the_longest_password() {
    let mut line = vec![b'y'; 1500];
    line.push(b'\n');
    let out = run_countersign(["hash-password", "--max-password-bytes", "1500"], &line);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(verifies(hash.trim(), &[b'y'; 1500]), "{hash}");
    assert!(
        stderr.contains("warning: the password is 1500 bytes, more than auth.max_password_bytes' default (1024)"),
        "{stderr}"
    );

    let out = run_countersign(["hash-password", "--max-password-bytes", "1499"], &line);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("password longer than 1499 bytes (--max-password-bytes)"),
        "{stderr}"
    );
    // Lowered below the default: a short limit is kept too.
    let out = run_countersign(["hash-password", "--max-password-bytes", "4"], b"abcde\n");
    assert_eq!(out.status.code(), Some(2));
    // Within the default: no warning.
    let out = run_countersign(["hash-password", "--max-password-bytes", "4"], b"abcd\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");

    for bad in ["0", "65537", "x", "1.5"] {
        let out = run_countersign(["hash-password", "--max-password-bytes", bad], b"pw\n");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--max-password-bytes"), "{bad}: {stderr}");
        assert!(stderr.contains("from 1 to 65536"), "{bad}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}

/// Runs `countersign dev --listen 127.0.0.1:0 ARGS` with `COUNTERSIGN_DEV_PASSWORD` set to
/// `password_env` (unset if None) and expects it to exit 2 rather than start: returns stderr.
fn dev_refused(args: &[&str], password_env: Option<&str>) -> String {
    let mut command = Command::new(BIN);
    command
        .args(["dev", "--listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("COUNTERSIGN_DEV_PASSWORD")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(value) = password_env {
        command.env("COUNTERSIGN_DEV_PASSWORD", value);
    }
    let mut child = command.spawn().unwrap();
    let Some(status) = exit_within(&mut child, Duration::from_secs(30)) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("dev started with {args:?} (COUNTERSIGN_DEV_PASSWORD {password_env:?})");
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    stderr
}

#[test]
fn dev_refuses_an_absolute_timeout_shorter_than_the_idle_timeout() {
    let stderr = dev_refused(&["--idle-timeout", "1h", "--absolute-timeout", "1m"], None);
    assert!(
        stderr.contains("--absolute-timeout")
            && stderr.contains("--idle-timeout")
            && stderr.contains("60s < 3600s"),
        "{stderr}"
    );
}

/// Starts `countersign dev` with `args` and `env`, reads its stdout up to the first line that
/// holds `last` (or to its end), then stops it. Returns the lines read.
fn dev_banner(args: &[&str], env: &[(&str, &str)], last: &str) -> String {
    let mut child = Command::new(BIN)
        .arg("dev")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    let mut line = String::new();
    while stdout.read_line(&mut line).unwrap_or(0) > 0 {
        banner.push_str(&line);
        if line.contains(last) {
            break;
        }
        line.clear();
    }
    let _ = child.kill();
    let _ = child.wait();
    banner
}

#[test]
fn dev_accepts_an_absolute_timeout_equal_to_the_idle_timeout() {
    let started = "countersign dev is running";
    let banner = dev_banner(
        &[
            "--listen",
            "127.0.0.1:0",
            "--password",
            "pw",
            "--idle-timeout",
            "1h",
            "--absolute-timeout",
            "60m",
        ],
        &[],
        started,
    );
    assert!(banner.contains(started), "dev did not start: {banner}");
}

/// `dev`'s password from `COUNTERSIGN_DEV_PASSWORD`: a password on the command line is
/// readable by every local user (`ps`), the environment of another user's process is not. The
/// banner prints the one taken; `--help` names the variable and never shows its value.
#[test]
fn dev_takes_its_password_from_the_environment() {
    let banner = dev_banner(
        &["--listen", "127.0.0.1:0"],
        &[("COUNTERSIGN_DEV_PASSWORD", "env-pw-4kq9")],
        "/auth/logout",
    );
    let password = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("password"))
        .map(str::trim);
    assert_eq!(password, Some("env-pw-4kq9"), "{banner}");

    let help = Command::new(BIN)
        .args(["dev", "--help"])
        .env("COUNTERSIGN_DEV_PASSWORD", "env-pw-4kq9")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("COUNTERSIGN_DEV_PASSWORD"), "{help}");
    assert!(!help.contains("env-pw-4kq9"), "{help}");
}

/// Settings counted in whole seconds refuse fractions on the command line as in a config file
/// (`session.idle_timeout = "500ms"` is an error there): `500ms` would have given sessions
/// that expire as they are made, `1500ms` silently 1 s. clap refuses before anything starts.
#[test]
fn whole_second_flags_refuse_fractions() {
    for args in [
        &["dev", "--listen", "127.0.0.1:0", "--idle-timeout", "500ms"][..],
        &[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--absolute-timeout",
            "1500ms",
        ],
        &[
            "demo-api",
            "--listen",
            "127.0.0.1:0",
            "--keyring",
            "keys.toml",
            "--window",
            "2500ms",
        ],
    ] {
        let out = Command::new(BIN)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("whole number of seconds"),
            "{args:?}: {stderr}"
        );
    }
}

/// `dev` names the flag, not a config key, when its admin address is taken.
#[test]
fn dev_names_the_admin_listen_flag_when_its_port_is_taken() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().to_string();
    let out = Command::new(BIN)
        .args([
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            &busy,
            "--password",
            "pw-123456",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--admin-listen") && stderr.contains(&busy),
        "{stderr}"
    );
    assert!(!stderr.contains("admin.listen"), "{stderr}");
}

/// `--memory`, `--iterations` and `--parallelism` become the hash's `m`, `t` and `p` (RFC 9106's
/// 64 MiB, 3, 4 here with a smaller `m`, to stay quick). A cost above the proxy's default
/// bounds is still hashed (the bounds may have been raised), with a warning that names the
/// `[auth]` key to raise: otherwise the operator learns it from a login that fails.
#[test]
fn hash_password_hashes_at_the_cost_given() {
    let args = [
        "hash-password",
        "--memory",
        "64KiB",
        "--iterations",
        "3",
        "--parallelism",
        "4",
    ];
    let out = run_countersign(args, b"pass word\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // Made, but weaker than any cost OWASP recommends: said so.
    assert_eq!(
        stderr.trim_end(),
        "countersign hash-password: warning: --memory 64KiB with --iterations 3 is weaker than \
         OWASP's least argon2id cost (19MiB with 2 iterations, argon2's default, or 46MiB with \
         1): a stolen users file is that much cheaper to guess passwords from"
    );
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$argon2id$v=19$m=64,t=3,p=4$"), "{hash}");
    assert!(verifies(&hash, b"pass word"));
    assert!(!verifies(&hash, b"pass wort"));

    let args = ["hash-password", "--memory", "8KiB", "--iterations", "11"];
    let out = run_countersign(args, b"pass word\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines[0],
        "countersign hash-password: warning: --iterations 11 is above \
         auth.max_hash_iterations (10), its default: a proxy refuses this hash unless that key \
         is raised"
    );
    assert!(
        lines[1].contains("--memory 8KiB with --iterations 11 is weaker"),
        "{stderr}"
    );
    assert_eq!(lines.len(), 2, "{stderr}");
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(hash.starts_with("$argon2id$v=19$m=8,t=11,p=1$"), "{hash}");

    // Each of OWASP's costs, and argon2's default (no flags), is made without a word; just
    // below one of them is not.
    for (flags, weak) in [
        (&[][..], false),
        (&["--memory", "46MiB", "--iterations", "1"][..], false),
        (&["--memory", "7MiB", "--iterations", "5"][..], false),
        (&["--memory", "19455KiB", "--iterations", "2"][..], true),
        (
            &[
                "--memory",
                "46MiB",
                "--iterations",
                "1",
                "--parallelism",
                "2",
            ][..],
            false,
        ),
    ] {
        let out = run_countersign(["hash-password"].iter().chain(flags), b"pass word\n");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{flags:?}: {stderr}");
        assert_eq!(
            stderr.contains("is weaker than OWASP"),
            weak,
            "{flags:?}: {stderr}"
        );
    }
}

/// A cost argon2 cannot use is refused naming its flag (exit 2), before the password is read:
/// stdin stays open here, and the command exits all the same.
#[test]
fn hash_password_refuses_a_cost_argon2_cannot_use_before_reading() {
    for (args, problem) in [
        (
            &["--memory", "1000"][..],
            "\"1000\" is not a whole number of KiB",
        ),
        (&["--memory", "5TiB"], "invalid size \"5TiB\""),
        (
            &["--memory", "4194304MiB"],
            "\"4194304MiB\" is more than argon2 can use",
        ),
        (
            &["--memory", "7KiB"],
            "--memory 7KiB is less than argon2's 8KiB per lane",
        ),
        (
            &["--memory", "31KiB", "--parallelism", "4"],
            "--memory 31KiB is less than argon2's 8KiB per lane (32KiB for --parallelism 4)",
        ),
        (&["--iterations", "0"], "'0' for '--iterations <N>'"),
        (&["--parallelism", "0"], "'0' for '--parallelism <N>'"),
        (
            &["--parallelism", "16777216"],
            "'16777216' for '--parallelism <N>'",
        ),
    ] {
        let mut child = spawn_countersign(["hash-password"].iter().chain(args));
        let stdin = child.stdin.take();
        let status = exit_within(&mut child, Duration::from_secs(20));
        drop(stdin);
        if status.is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let status = status.unwrap_or_else(|| panic!("{args:?}: waited for stdin: {stderr}"));
        assert_eq!(status.code(), Some(2), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(stderr.contains(problem), "{args:?}: {stderr}");
    }
}

/// An empty or over-long demo password names where it came from (`--password` or
/// `COUNTERSIGN_DEV_PASSWORD`): the message was "countersign: empty password".
#[test]
fn dev_names_the_source_of_a_password_it_refuses() {
    let long = "p".repeat(1025);
    for (args, env, problem) in [
        (&["--password", ""][..], None, "is empty"),
        (&[][..], Some(""), "is empty"),
        (&[][..], Some(long.as_str()), "is longer than 1024 bytes"),
    ] {
        let stderr = dev_refused(args, env);
        assert!(
            stderr.contains("--password (or COUNTERSIGN_DEV_PASSWORD)") && stderr.contains(problem),
            "{stderr}"
        );
    }
}

/// A demo password that is not UTF-8, in `COUNTERSIGN_DEV_PASSWORD` or `--password`, is refused
/// naming both (exit 2) and without echoing it: clap's own message named neither ("invalid
/// UTF-8 was detected in one or more arguments").
#[test]
fn dev_refuses_a_password_that_is_not_utf8_naming_its_source() {
    use std::os::unix::ffi::OsStrExt as _;
    let bytes = std::ffi::OsStr::from_bytes(b"pw\xff\xfe-secret");
    for on_command_line in [false, true] {
        let mut command = Command::new(BIN);
        command
            .args(["dev", "--listen", "127.0.0.1:0"])
            .env_remove("COUNTERSIGN_DEV_PASSWORD")
            .stdin(Stdio::null());
        if on_command_line {
            command.arg("--password").arg(bytes);
        } else {
            command.env("COUNTERSIGN_DEV_PASSWORD", bytes);
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let Some(status) = exit_within(&mut child, Duration::from_secs(30)) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("dev started with a password that is not UTF-8");
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("--password (or COUNTERSIGN_DEV_PASSWORD) is not UTF-8"),
            "{on_command_line}: {stderr}"
        );
        assert!(!stderr.contains("secret"), "the value was echoed: {stderr}");
    }
}

/// `--memory` more than the machine can give is refused before the password is read, exit 2
/// naming the flag: argon2 allocates it at once, and a failed allocation aborted the process
/// (exit 134, "memory allocation of ... failed") after the password was typed.
#[test]
fn hash_password_refuses_memory_the_machine_cannot_give() {
    let out = run_countersign(["hash-password", "--memory", "4000GiB"], b"pw\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("countersign hash-password: --memory 4000GiB cannot be allocated"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    // A size that is no size suggests one argon2 takes (the shared hint said "512", which is
    // no whole number of KiB and refused in turn).
    let out = run_countersign(["hash-password", "--memory", "64mb"], b"pw\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("use e.g. \"19MiB\""), "{stderr}");
}

/// A message that cannot be written to stderr (`2>/dev/full`) still exits 2: `eprintln!`
/// panicked (exit 101).
#[test]
fn errors_exit_2_when_stderr_cannot_be_written() {
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let check = Command::new(BIN)
        .args(["check-config", "--config", "/nonexistent/proxy.toml"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(full())
        .status()
        .unwrap();
    assert_eq!(check.code(), Some(2));
    let hash = Command::new(BIN)
        .args(["hash-password", "--memory", "4KiB"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(full())
        .status()
        .unwrap();
    assert_eq!(hash.code(), Some(2));
}

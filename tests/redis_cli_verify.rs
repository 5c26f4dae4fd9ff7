//! `countersign verify --replay-redis URL`: separate `verify` processes share the nonce history
//! in a real `redis-server`, so a request accepted by one is `replayed` for the next; Redis
//! down is `replay_cache_unavailable` (fail closed); a bad URL is a usage error that does not
//! echo the password.
#![cfg(feature = "proxy")]

mod support_cli;
mod support_redis;

use support_cli::{run, run_countersign, Run};
use support_redis::{RedisServer, TestDir};

/// 32 bytes 0x00..0x1f, base64.
const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const CREATED: u64 = 1_700_000_000;

const REQUEST: &[u8] = b"POST /orders HTTP/1.1\r\n\
Host: api.example.com\r\n\
Content-Type: application/json\r\n\
Content-Length: 9\r\n\
\r\n\
{\"qty\":3}";

/// A keyring file in a directory of its own (tests run in parallel), removed with the guard.
fn keyring() -> (TestDir, String) {
    let dir = TestDir::new("redis-cli");
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET}\"\n"),
    )
    .unwrap();
    let path = path.display().to_string();
    (dir, path)
}

fn signed(keyring: &str, nonce: &str) -> Vec<u8> {
    let created = CREATED.to_string();
    let out = run_countersign(
        [
            "sign",
            "--keyring",
            keyring,
            "--created",
            &created,
            "--nonce",
            nonce,
            "--user",
            "alice",
        ],
        REQUEST,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn verify(keyring: &str, request: &[u8], url: &str) -> Run {
    let now = (CREATED + 2).to_string();
    run(
        &[
            "verify",
            "--keyring",
            keyring,
            "--now",
            &now,
            "--replay-redis",
            url,
        ],
        request,
    )
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(run.stdout.trim_end()).unwrap()
}

#[test]
fn a_request_accepted_by_one_process_is_replayed_for_the_next() {
    let server = RedisServer::start();
    let (_dir, keyring) = keyring();
    let request = signed(&keyring, "cli-replay-nonce-0000001");

    let first = verify(&keyring, &request, &server.url());
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(json(&first)["valid"], true);
    assert_eq!(json(&first)["user"], "alice");

    let second = verify(&keyring, &request, &server.url());
    assert_eq!(second.code, 1, "{}", second.stderr);
    assert_eq!(json(&second)["valid"], false);
    assert_eq!(json(&second)["reason"], "replayed");

    // The nonce lives in Redis under the default prefix, for the signature's lifetime.
    assert_eq!(
        server.cli(&["EXISTS", "countersign:nonce:cli-replay-nonce-0000001"]),
        "1"
    );
    // Another nonce is fresh.
    let other = signed(&keyring, "cli-replay-nonce-0000002");
    assert_eq!(verify(&keyring, &other, &server.url()).code, 0);
}

#[test]
fn an_invalid_signature_records_nothing() {
    let server = RedisServer::start();
    let (_dir, keyring) = keyring();
    let mut request = signed(&keyring, "cli-tampered-nonce-00001");
    // Tamper with the body: the digest no longer matches.
    let last = request.len() - 2;
    request[last] = b'4';
    let out = verify(&keyring, &request, &server.url());
    assert_eq!(out.code, 1);
    assert_ne!(json(&out)["reason"], "replayed");
    assert_eq!(server.cli(&["DBSIZE"]), "0");
}

#[test]
fn redis_down_is_replay_cache_unavailable() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let (_dir, keyring) = keyring();
    let request = signed(&keyring, "cli-down-nonce-000000001");
    let out = verify(&keyring, &request, &url);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert_eq!(json(&out)["reason"], "replay_cache_unavailable");
}

#[test]
fn a_bad_url_is_a_usage_error_without_the_password() {
    let (_dir, keyring) = keyring();
    let request = signed(&keyring, "cli-badurl-nonce-0000001");
    let out = verify(&keyring, &request, "http://user:pa55word@localhost/");
    assert_eq!(out.code, 2);
    assert!(out.stderr.contains("--replay-redis"), "{}", out.stderr);
    assert!(!out.stderr.contains("pa55word"), "{}", out.stderr);
    assert_eq!(out.stdout, "");
}

/// A refused connection and refused credentials are answered at once (not after the 2 s
/// connect deadline) and the detail on stderr names the cause, never the password.
#[test]
fn refused_connections_and_credentials_are_named_and_answered_at_once() {
    let server = RedisServer::start_with(&["--requirepass", "right-pw"]);
    let port = server.addr().port();
    // Nothing listens there (held by the test, so nothing else can take it).
    let (_refusing, closed) = support_redis::refusing_addr();
    let closed_port = closed.port();
    let (_dir, keyring) = keyring();
    let request = signed(&keyring, "cli-refused-nonce-000001");
    for (url, cause) in [
        (
            format!("redis://u:BADPASSWORD@127.0.0.1:{port}/0"),
            "authentication failed",
        ),
        (
            format!("redis://127.0.0.1:{closed_port}/0"),
            "Connection refused",
        ),
    ] {
        let started = std::time::Instant::now();
        let out = verify(&keyring, &request, &url);
        let elapsed = started.elapsed();
        assert_eq!(out.code, 1, "{url}: {}", out.stderr);
        assert_eq!(json(&out)["reason"], "replay_cache_unavailable");
        assert!(out.stderr.contains(cause), "{url}: {}", out.stderr);
        assert!(!out.stderr.contains("timed out"), "{url}: {}", out.stderr);
        assert!(!out.stderr.contains("BADPASSWORD"), "{}", out.stderr);
        // The whole process, started and ended, in less than the connect deadline that a wait
        // for it would take on its own (startup on a busy machine needs some of the slack).
        assert!(
            elapsed < std::time::Duration::from_secs(2),
            "{url}: took {elapsed:?}: {}",
            out.stderr
        );
    }
    assert_eq!(
        server.cli(&["-a", "right-pw", "--no-auth-warning", "DBSIZE"]),
        "0"
    );
}

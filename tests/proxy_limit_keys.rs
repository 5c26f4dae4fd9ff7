//! The limits that used to be constants, now config keys: `admin.max_connections`,
//! `server.http2_max_concurrent_streams`, `server.max_header_count`, `server.static_cache_size`,
//! `auth.max_username_bytes`, `auth.max_password_bytes`, `auth.max_verify_answer`.
//! Each is parsed from a config file (defaults, values reaching the settings, errors naming file
//! and key) and observed on a proxy serving on loopback.
//! Run: `cargo test --all-features --test proxy_limit_keys`.

#![cfg(feature = "proxy")]

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use countersign::proxy::config::ProxyConfig;
use countersign::proxy::server::ProxySettings;
use countersign::proxy::users::{UserDb, UserRecord};
use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const BASE: &str =
    "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://localhost:8080\"\n\
     [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n\
     [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n";

fn parse(text: &str) -> Result<ProxyConfig, countersign::proxy::config::ConfigError> {
    ProxyConfig::parse(text, Path::new("/etc/countersign/proxy.toml"))
}

// ---------------------------------------------------------------------------------------------
// Config: defaults, values, errors
// ---------------------------------------------------------------------------------------------

#[test]
fn the_keys_default_to_the_previously_built_in_values() {
    let config = parse(BASE).unwrap();
    assert_eq!(config.admin.max_connections, 64);
    assert_eq!(config.server.http2_max_concurrent_streams, 256);
    assert_eq!(config.auth.max_username_bytes, 256);
    assert_eq!(config.auth.max_password_bytes, 1024);
    assert_eq!(config.auth.max_verify_answer, 64 * 1024);
    assert_eq!(config.server.max_header_count, 100);
    assert_eq!(config.server.http2_max_reset_streams, 100);
    assert_eq!(config.server.static_cache_size, 64 * 1024 * 1024);
    let settings = ProxySettings::from_config(&config).unwrap();
    assert_eq!(settings.max_header_count, 100);
    assert_eq!(settings.admin_max_connections, 64);
    assert_eq!(settings.http2_max_concurrent_streams, 256);
    assert_eq!(settings.max_username_bytes, 256);
    assert_eq!(settings.max_password_bytes, 1024);
    assert_eq!(settings.max_verify_answer, 64 * 1024);
}

#[test]
fn the_keys_are_parsed_and_reach_the_settings() {
    let text = BASE
        .replace(
            "public_origin = \"http://localhost:8080\"\n",
            "public_origin = \"http://localhost:8080\"\nhttp2_max_concurrent_streams = 16\n\
             max_header_count = 30\nhttp2_max_reset_streams = 7\n[admin]\nlisten = \"127.0.0.1:9090\"\nmax_connections = 3\n",
        )
        .replace(
            "users_file = \"users.toml\"\n",
            "verify_url = \"http://127.0.0.1:3000/verify\"\nmax_username_bytes = 40\n\
             max_verify_answer = \"2KiB\"\nmax_password_bytes = 65536\n",
        );
    let config = parse(&text).unwrap();
    assert_eq!(config.admin.max_connections, 3);
    assert_eq!(config.server.http2_max_concurrent_streams, 16);
    assert_eq!(config.auth.max_username_bytes, 40);
    assert_eq!(config.auth.max_password_bytes, 65536);
    assert_eq!(config.auth.max_verify_answer, 2048);
    let settings = ProxySettings::from_config(&config).unwrap();
    assert_eq!(settings.admin_max_connections, 3);
    assert_eq!(settings.http2_max_concurrent_streams, 16);
    assert_eq!(settings.max_header_count, 30);
    assert_eq!(settings.http2_max_reset_streams, 7);
    assert_eq!(settings.max_username_bytes, 40);
    assert_eq!(settings.max_password_bytes, 65536);
    assert_eq!(settings.max_verify_answer, 2048);
}

#[test]
fn bad_values_name_the_file_the_key_and_the_problem() {
    let cases: Vec<(String, &str, &str)> = vec![
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nhttp2_max_concurrent_streams = 0\n",
            ),
            "server.http2_max_concurrent_streams",
            "greater than zero",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nhttp2_max_concurrent_streams = -1\n",
            ),
            "http2_max_concurrent_streams",
            "",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nmax_header_count = 0\n",
            ),
            "server.max_header_count",
            "between 1 and 10000",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nmax_header_count = 10001\n",
            ),
            "server.max_header_count",
            "between 1 and 10000",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nhttp2_max_reset_streams = 0\n",
            ),
            "server.http2_max_reset_streams",
            "between 1 and 1000000",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nhttp2_max_reset_streams = 1000001\n",
            ),
            "server.http2_max_reset_streams",
            "between 1 and 1000000",
        ),
        (
            format!("{BASE}[admin]\nlisten = \"127.0.0.1:9090\"\nmax_connections = 0\n"),
            "admin.max_connections",
            "",
        ),
        (
            format!("{BASE}[admin]\nmax_connections = 5\n"),
            "admin.max_connections",
            "only used with admin.listen",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nstatic_cache_size = \"1MiB\"\n",
            ),
            "server.static_cache_size",
            "only used with server.static_dir",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nstatic_dir = \".\"\n\
                 static_cache_size = \"lots\"\n",
            ),
            "server.static_cache_size",
            "",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nstatic_immutable = [\"/assets/\"]\n",
            ),
            "server.static_immutable",
            "only used with server.static_dir",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nstatic_dir = \".\"\n\
                 static_immutable = [\"/assets/\", \"/static\"]\n",
            ),
            "server.static_immutable[1]",
            "must be a folder path",
        ),
        (
            BASE.replace(
                "public_origin = \"http://localhost:8080\"\n",
                "public_origin = \"http://localhost:8080\"\nstatic_dir = \".\"\n\
                 static_immutable = [\"/\"]\n",
            ),
            "server.static_immutable[0]",
            "not the site root",
        ),
        (
            BASE.replace(
                "users_file = \"users.toml\"\n",
                "users_file = \"users.toml\"\nmax_username_bytes = 0\n",
            ),
            "auth.max_username_bytes",
            "",
        ),
        (
            BASE.replace(
                "users_file = \"users.toml\"\n",
                "users_file = \"users.toml\"\nmax_password_bytes = 0\n",
            ),
            "auth.max_password_bytes",
            "must be between 1 and 65536",
        ),
        (
            BASE.replace(
                "users_file = \"users.toml\"\n",
                "users_file = \"users.toml\"\nmax_password_bytes = 65537\n",
            ),
            "auth.max_password_bytes",
            "must be between 1 and 65536",
        ),
        (
            BASE.replace(
                "users_file = \"users.toml\"\n",
                "users_file = \"users.toml\"\nmax_verify_answer = \"1KiB\"\n",
            ),
            "auth.max_verify_answer",
            "only used with auth.verify_url",
        ),
        (
            BASE.replace(
                "users_file = \"users.toml\"\n",
                "verify_url = \"http://127.0.0.1:3000/v\"\nmax_verify_answer = \"0\"\n",
            ),
            "auth.max_verify_answer",
            "greater than zero",
        ),
        (
            BASE.replace(
                "users_file = \"users.toml\"\n",
                "verify_url = \"http://127.0.0.1:3000/v\"\nmax_verify_answer = \"lots\"\n",
            ),
            "auth.max_verify_answer",
            "",
        ),
    ];
    for (text, key, problem) in cases {
        let err = parse(&text).expect_err(key).to_string();
        assert!(err.contains("/etc/countersign/proxy.toml"), "{err}");
        assert!(err.contains(key), "expected {key} in: {err}");
        assert!(err.contains(problem), "expected {problem:?} in: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Behaviour on a serving proxy
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn admin_connections_over_max_connections_are_closed() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| {
            s.admin_max_connections = 2;
            // Only the clients' leaving can free the held slots within this test.
            s.header_read_timeout = Duration::from_secs(60);
        }),
        ..HarnessOptions::default()
    })
    .await;
    let held1 = tokio::net::TcpStream::connect(h.admin).await.unwrap();
    let held2 = tokio::net::TcpStream::connect(h.admin).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let probe = b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n";
    let answer = raw_exchange(h.admin, probe).await;
    assert!(
        answer.is_empty(),
        "third admin connection was served: {answer}"
    );
    // The main listener is not affected by the admin cap.
    let r = send(h.addr, Method::GET, "/auth/session", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    drop(held1);
    drop(held2);
    // The slots are free once the server has seen the two closes: polled, not a fixed pause.
    let answer = answered_once_a_slot_is_free(h.admin, probe).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// The `SETTINGS_MAX_CONCURRENT_STREAMS` value the proxy announces to an HTTP/2 (h2c, prior
/// knowledge) client, read from its first SETTINGS frame (RFC 9113 §6.5).
async fn announced_max_streams(addr: std::net::SocketAddr) -> Option<u32> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    stream.write_all(&hello).await.unwrap();
    loop {
        let mut head = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut head))
            .await
            .expect("a frame within 5 s")
            .expect("the proxy speaks HTTP/2");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.unwrap();
        let (kind, ack) = (head[3], head[4] & 1 == 1);
        if kind != 4 || ack {
            continue;
        }
        return payload.chunks_exact(6).find_map(|setting| {
            (u16::from_be_bytes([setting[0], setting[1]]) == 3)
                .then(|| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
        });
    }
}

#[tokio::test]
async fn http2_clients_are_told_the_configured_stream_limit() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| s.http2_max_concurrent_streams = 7),
        ..HarnessOptions::default()
    })
    .await;
    assert_eq!(announced_max_streams(h.addr).await, Some(7));
    let h = Harness::start().await;
    assert_eq!(announced_max_streams(h.addr).await, Some(256));
}

/// A request head of `fields` fields (`Host` and `X-Pad-<i>`), and what the proxy answers.
async fn status_with_fields(addr: std::net::SocketAddr, fields: usize) -> String {
    let mut head = format!("GET /auth/session HTTP/1.1\r\nHost: {addr}\r\n");
    for i in 1..fields {
        head.push_str(&format!("X-Pad-{i}: x\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn request_heads_over_max_header_count_are_431() {
    // Configured below the default.
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| s.max_header_count = 20),
        ..HarnessOptions::default()
    })
    .await;
    // Without a session cookie the session endpoint answers 401: the head was read.
    // (`Connection: close` is a field too.)
    assert!(status_with_fields(h.addr, 19).await.contains(" 401 "));
    assert!(status_with_fields(h.addr, 20).await.contains(" 431 "));
    // Above the default (the heap path in hyper).
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| s.max_header_count = 300),
        ..HarnessOptions::default()
    })
    .await;
    assert!(status_with_fields(h.addr, 250).await.contains(" 401 "));
    assert!(status_with_fields(h.addr, 301).await.contains(" 431 "));
    // The default: 100 fields.
    let h = Harness::start().await;
    assert!(status_with_fields(h.addr, 99).await.contains(" 401 "));
    assert!(status_with_fields(h.addr, 101).await.contains(" 431 "));
}

#[tokio::test]
async fn a_user_name_over_max_username_bytes_is_refused_before_any_check() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| s.max_username_bytes = 5),
        ..HarnessOptions::default()
    })
    .await;
    // "alice" is exactly 5 bytes: accepted.
    h.login("alice", ALICE_PASSWORD).await;
    // Six bytes: refused as a bad request (not a failed login: nothing is throttled).
    let long = h.login_raw("alicee", ALICE_PASSWORD).await;
    assert_eq!(long.status, StatusCode::BAD_REQUEST, "{}", long.text());
    assert!(long.set_cookie().is_none());
    // The limit counts bytes, not characters: "ålic" is 4 characters, 5 bytes (accepted as a
    // name, unknown user); "ålice" is 6 bytes.
    let four_chars = h.login_raw("ålic", "x").await;
    assert_eq!(four_chars.status, StatusCode::UNAUTHORIZED);
    let six_bytes = h.login_raw("ålice", "x").await;
    assert_eq!(six_bytes.status, StatusCode::BAD_REQUEST);
}

/// The login's password bound: refused as a bad request over it, before the throttle counts or
/// argon2 runs; raised, a user whose password is longer than the default logs in.
#[tokio::test]
async fn a_password_over_max_password_bytes_is_refused_and_a_raised_one_logs_in() {
    let long_password = "p".repeat(1500);
    let users = UserDb::from_records(vec![UserRecord {
        name: "lena".into(),
        password_hash: cheap_hash(&long_password),
        roles: vec![],
    }])
    .unwrap();
    let start = |max_password_bytes: Option<usize>| {
        Harness::start_with(HarnessOptions {
            users: Some(users.clone()),
            tweak: Box::new(move |s, _| {
                if let Some(max) = max_password_bytes {
                    s.max_password_bytes = max;
                }
            }),
            // One failure throttles the user: a refusal that counted would show at once.
            max_failures_per_user: 1,
            ..HarnessOptions::default()
        })
    };
    // The default, 1024 bytes: 1500 is a bad request, never a failed login, however often.
    let h = start(None).await;
    for _ in 0..3 {
        let r = h.login_raw("lena", &long_password).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert_eq!(r.error_code(), "bad_request");
        assert!(r.set_cookie().is_none());
    }
    // Nothing was counted: a wrong password of an allowed length is a first failure (401).
    let wrong = h.login_raw("lena", "wrong").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED, "{}", wrong.text());

    // At exactly 1500 bytes it logs in; at 1499 it is refused again.
    let h = start(Some(1500)).await;
    let r = h.login_raw("lena", &long_password).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["user"], "lena");
    let h = start(Some(1499)).await;
    let r = h.login_raw("lena", &long_password).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

/// With `verify_url` the bound applies before the API is asked: an over-long password never
/// leaves the proxy.
#[tokio::test]
async fn a_password_over_max_password_bytes_is_never_sent_to_verify_url() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, up| {
            check_logins_at_the_upstream(s, up);
            s.max_password_bytes = 8;
        }),
        ..HarnessOptions::default()
    })
    .await;
    let asked = h.upstream.raw_count();
    let r = h.login_raw("vera", "vera-pw-9").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    assert_eq!(h.upstream.raw_count(), asked, "the API was asked");
    // At the limit it is asked (and refuses: the password is wrong).
    let r = h.login_raw("vera", "vera-pw8").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(h.upstream.raw_count(), asked + 1);
}

#[tokio::test]
async fn a_verify_url_answer_over_max_verify_answer_is_a_502() {
    let verify_url = |s: &mut ProxySettings, up: &Upstream| {
        s.verify_url = Some(
            format!("{}/auth/verify-credentials", up.url())
                .parse()
                .unwrap(),
        );
    };
    // The test upstream answers vera with {"user":"vera","roles":["auditor"]}: 36 bytes.
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, up| {
            verify_url(s, up);
            s.max_verify_answer = 16;
        }),
        ..HarnessOptions::default()
    })
    .await;
    let r = h.login_raw("vera", "vera-pw").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.error_code(), "bad_gateway");
    assert!(r.set_cookie().is_none());

    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, up| {
            verify_url(s, up);
            s.max_verify_answer = 64;
        }),
        ..HarnessOptions::default()
    })
    .await;
    let r = h.login_raw("vera", "vera-pw").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json()["user"], "vera");
}

//! HTTPS edge cases of the main listener: ALPN offers other than the usual `h2, http/1.1`;
//! `server.tls_cert` / `tls_key` files that never end, or an encrypted key.
//! Run: `cargo test --all-features --test proxy_tls_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;

use std::time::Duration;

use support::*;
use support_run::{write_config, BIN};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A TLS handshake with the proxy offering `alpn`: the stream, or the handshake's error.
async fn handshake(
    tls: &TlsHarness,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(tls.h.addr).await.unwrap();
    let connector = tls_connector(tls.roots.clone(), alpn);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
        .await
        .expect("the handshake ends")
}

/// `curl --http1.0` (and other HTTP/1.0 clients) offer ALPN `http/1.0` alone. rustls refuses
/// an offer that shares no protocol with the server's list (`no_application_protocol`), so
/// with `h2, http/1.1` only, such a client could not connect at all although hyper serves
/// HTTP/1.0. Now it gets `http/1.0` and its answer; `h2` stays the server's first choice, and
/// an offer of only protocols that are not HTTP is still refused.
#[tokio::test]
async fn an_http_1_0_alpn_offer_is_served_over_http1() {
    let tls = start_tls("tls-alpn-http10", |_| {}).await;

    let mut stream = handshake(&tls, &[b"http/1.0"])
        .await
        .expect("a client offering ALPN http/1.0 alone completes the handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.0"[..]));
    stream
        .write_all(b"GET /auth/session HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    // HTTP/1.0 without keep-alive: the proxy closes after its answer.
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1."), "{answer}");
    assert!(answer.contains(" 401 "), "{answer}");
    assert!(answer.contains("unauthenticated"), "{answer}");

    // The server's preference decides: a client listing http/1.0 first still gets h2.
    let stream = handshake(&tls, &[b"http/1.0", b"http/1.1", b"h2"])
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // Not HTTP at all (e.g. ACME's TLS-ALPN-01 challenge protocol): refused in the handshake.
    let refused = handshake(&tls, &[b"acme-tls/1"]).await;
    assert!(refused.is_err(), "a non-HTTP ALPN offer was accepted");
}

/// `countersign check-config` on a config in `dir` (with its `cert.pem` / `key.pem` or other
/// files) whose `tls_cert` / `tls_key` are `cert` and `key`, within 1 GiB of address space (so
/// that a file read without a bound aborts the command instead of taking the machine's
/// memory): its exit code and stderr.
fn check_config_with(dir: &std::path::Path, cert: &str, key: &str) -> (Option<i32>, String) {
    let config = write_config(
        dir,
        "127.0.0.1:0",
        None,
        "http://127.0.0.1:9",
        &keyring_file_text("k1"),
        &users_file_text(),
    );
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "public_origin = \"http://app.test\"\n",
        &format!(
            "public_origin = \"https://localhost\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n"
        ),
    );
    assert!(text.contains("tls_key"), "{text}");
    write(&config, &text);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 1048576 && exec \"$0\" check-config --config \"$1\"")
        .arg(BIN)
        .arg(&config)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A self-signed certificate for `localhost` and its key, as `cert.pem` and `key.pem` in a new
/// directory; the key's PEM too.
fn tls_dir(tag: &str) -> (TestDir, String) {
    let dir = temp_dir(tag);
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let key = certified.key_pair.serialize_pem();
    write(&dir.join("cert.pem"), &certified.cert.pem());
    write(&dir.join("key.pem"), &key);
    (dir, key)
}

/// `server.tls_cert` or `tls_key` naming a file that never ends (a device such as `/dev/zero`
/// or `/dev/urandom`, by mistake or through a symlink) was read until memory ran out: the PEM
/// reader buffers a line until its newline, so the proxy (`run`, a SIGHUP reload,
/// `check-config`) grew without bound and aborted. Now each file is read up to 1 MiB and a
/// longer one is a config error naming the file.
#[test]
fn a_tls_file_that_never_ends_is_a_clear_error_not_unbounded_memory() {
    if !std::path::Path::new("/dev/zero").exists() {
        return;
    }
    let (dir, _) = tls_dir("tls-endless-file");
    for (cert, key) in [("cert.pem", "/dev/zero"), ("/dev/zero", "key.pem")] {
        let (code, stderr) = check_config_with(&dir, cert, key);
        assert_eq!(code, Some(2), "{cert} {key}: {stderr}");
        assert!(
            stderr.contains("server.tls_cert/tls_key: /dev/zero: larger than 1048576 bytes"),
            "{cert} {key}: {stderr}"
        );
    }
}

/// An encrypted `tls_key` (PKCS#8 `ENCRYPTED PRIVATE KEY`, or OpenSSL's legacy encryption with
/// `Proc-Type: 4,ENCRYPTED` headers) was "no private key found" or a bare base64 error
/// (`InvalidCharacter(45)`); it is now said to be encrypted, with what to do, as an upstream's
/// `client_key_file` is. Needs the `openssl` command, which scripts/test.sh installs: without it
/// the test fails, never skips.
#[test]
fn an_encrypted_tls_key_is_named_as_such() {
    let (dir, key) = tls_dir("tls-encrypted-key");
    for args in [
        &[
            "pkcs8",
            "-topk8",
            "-v2",
            "aes-256-cbc",
            "-passout",
            "pass:secret",
        ][..],
        &["pkey", "-traditional", "-aes256", "-passout", "pass:secret"][..],
    ] {
        let encrypted = openssl(args, &key);
        assert!(encrypted.contains("ENCRYPTED"), "{encrypted}");
        write(&dir.join("encrypted.pem"), &encrypted);
        let (code, stderr) = check_config_with(&dir, "cert.pem", "encrypted.pem");
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("encrypted.pem: the private key is encrypted, which is not supported"),
            "{args:?}: {stderr}"
        );
    }
}

/// A `tls_cert` whose certificate has expired, or is not valid yet, was served: every
/// browser refused each handshake, and nothing said why until a user complained. It is now a
/// config error (`check-config`, start; a reload keeps the current pair, `proxy_tls_reload`)
/// naming the file and the date, as an upstream's `client_cert_file` already was.
#[test]
fn an_expired_or_not_yet_valid_tls_cert_is_refused_naming_the_date() {
    let dir = temp_dir("tls-validity");
    for (from, until, problem) in [
        (
            2019,
            2020,
            "cert.pem: the certificate expired at 2020-01-01 00:00:00 UTC (notAfter); renew it",
        ),
        (
            2200,
            2201,
            "cert.pem: the certificate is not valid before 2200-01-01 00:00:00 UTC (notBefore)",
        ),
    ] {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        write(&dir.join("cert.pem"), &cert.pem());
        write(&dir.join("key.pem"), &key.serialize_pem());
        let (code, stderr) = check_config_with(&dir, "cert.pem", "key.pem");
        assert_eq!(code, Some(2), "{from}-{until}: {stderr}");
        assert!(
            stderr.contains("server.tls_cert/tls_key: ") && stderr.contains(problem),
            "{from}-{until}: {stderr}"
        );
    }
    // The same files with a certificate valid now pass.
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    write(&dir.join("cert.pem"), &certified.cert.pem());
    write(&dir.join("key.pem"), &certified.key_pair.serialize_pem());
    let (code, stderr) = check_config_with(&dir, "cert.pem", "key.pem");
    assert_eq!(code, Some(0), "{stderr}");
}

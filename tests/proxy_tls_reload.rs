//! SIGHUP reloads the TLS certificate and key (`server.tls_cert` / `tls_key`) as a pair: new
//! connections get the new certificate on every event loop, established ones (and sessions)
//! are untouched; a bad pair is one error line and the old certificate stays; HTTP/2 is still
//! chosen by ALPN afterwards. Through a real SIGHUP to the binary (`--workers 2`: the
//! thread-per-core listeners) and in-process (`ProxyServer::reload_tls`, `start_on`).
//! Run: `cargo test --all-features --test proxy_tls_reload`.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;
mod support_run;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use countersign::clock::SystemClock;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use support::*;
use support_run::*;
use tokio_rustls::client::TlsStream;

/// A self-signed `localhost` certificate with a key of its own.
struct Pair {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn new_pair() -> Pair {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    Pair {
        cert_pem: certified.cert.pem(),
        key_pem: certified.key_pair.serialize_pem(),
        der: certified.cert.der().clone(),
    }
}

/// [`new_pair`] valid from 2019 to 2020 only (expired), or from 2200 on (not valid yet).
fn pair_valid(from: i32, until: i32) -> Pair {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(until, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Pair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
    }
}

fn install(dir: &Path, cert: &str, key: &str) {
    write(&dir.join("cert.pem"), cert);
    write(&dir.join("key.pem"), key);
}

/// A client trusting every certificate in `trusted`, offering `alpn`.
async fn connect(
    addr: SocketAddr,
    trusted: &[&CertificateDer<'static>],
    alpn: &[&[u8]],
) -> TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add((*cert).clone()).unwrap();
    }
    let connector = support::tls_connector(roots, alpn);
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await.expect("TLS handshake")
}

/// The certificate the server presented on `stream`.
fn presented(stream: &TlsStream<tokio::net::TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// The certificate a new connection gets.
async fn presented_now(
    addr: SocketAddr,
    trusted: &[&CertificateDer<'static>],
) -> CertificateDer<'static> {
    presented(&connect(addr, trusted, &[b"http/1.1"]).await)
}

/// Polls new connections until one presents `wanted` (or panics after 15 s with `context`),
/// then checks that the next ones all do too: with several event loops the kernel spreads
/// them over all of their listeners.
async fn wait_presented(
    addr: SocketAddr,
    trusted: &[&CertificateDer<'static>],
    wanted: &CertificateDer<'static>,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while presented_now(addr, trusted).await != *wanted {
        assert!(
            Instant::now() < deadline,
            "the new certificate is not served: {}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..12 {
        assert!(
            presented_now(addr, trusted).await == *wanted,
            "connection {i} after the reload got another certificate: {}",
            context()
        );
    }
}

fn login_request() -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri("/auth/login")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .header("origin", "https://localhost")
        .body(Full::new(Bytes::from(
            serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string(),
        )))
        .unwrap()
}

fn session_request(cookie: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri("https://localhost/auth/session")
        .header("host", "localhost")
        .header("cookie", cookie)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn http1(stream: TlsStream<tokio::net::TcpStream>) -> H1 {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// `GET /auth/session` with `cookie` over a new HTTP/1.1 connection: the status.
async fn session_status(
    addr: SocketAddr,
    trusted: &[&CertificateDer<'static>],
    cookie: &str,
) -> StatusCode {
    let mut sender = http1(connect(addr, trusted, &[b"http/1.1"]).await).await;
    sender
        .send_request(session_request(cookie))
        .await
        .unwrap()
        .status()
}

/// `countersign run --workers 2` over TLS with `cert.pem` / `key.pem` (written from `pair`)
/// in a fresh directory (returned first, so that it is dropped after the binary).
fn start_binary(
    tag: &str,
    pair: &Pair,
    upstream: &Upstream,
) -> (TestDir, RunningProxy, SocketAddr) {
    let dir = temp_dir(tag);
    install(&dir, &pair.cert_pem, &pair.key_pem);
    let (proxy, addr) = start_binary_in(&dir, upstream, "");
    (dir, proxy, addr)
}

/// [`start_binary`] on the `cert.pem` / `key.pem` already in `dir`, with `server_lines` added
/// to `[server]`.
fn start_binary_in(
    dir: &Path,
    upstream: &Upstream,
    server_lines: &str,
) -> (RunningProxy, SocketAddr) {
    let (mut proxy, addr, _) = start_on_free_ports(|addr, _| {
        let config = write_config(
            dir,
            &addr.to_string(),
            None,
            &upstream.url(),
            &keyring_file_text("k1"),
            &users_file_text(),
        );
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "public_origin = \"http://app.test\"\n",
            &format!(
                "public_origin = \"https://localhost\"\ntls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n{server_lines}"
            ),
        );
        assert!(text.contains("tls_cert"), "{text}");
        write(&config, &text);
        RunningProxy::spawn(&config, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    (proxy, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_the_certificate_for_new_connections_and_keeps_old_ones_and_sessions() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let (a, b) = (new_pair(), new_pair());
    let both = [&a.der, &b.der];
    let (dir, mut proxy, addr) = start_binary("tls-reload", &a, &upstream);

    // A connection opened (and a session begun) before the reload, on certificate A.
    let before = connect(addr, &both, &[b"http/1.1"]).await;
    assert!(presented(&before) == a.der);
    let mut before = http1(before).await;
    let response = before.send_request(login_request()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    assert!(cookie.starts_with("__Host-"), "{cookie}");

    install(&dir, &b.cert_pem, &b.key_pem);
    proxy.signal("HUP");
    wait_presented(addr, &both, &b.der, || proxy.log()).await;
    let loaded = proxy.wait_json_messages("INFO", &["SIGHUP: reloaded server.tls_cert/tls_key"], 1);
    assert!(
        loaded[0].contains("cert.pem")
            && loaded[0].contains("key.pem")
            && loaded[0].contains(&sha256_fingerprint(&b.der)),
        "{loaded:?}"
    );

    // The connection from before still serves requests (on A), and the session lives on,
    // on both the old connection and new ones.
    let response = before.send_request(session_request(&cookie)).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("alice"), "{body:?}");
    assert_eq!(session_status(addr, &both, &cookie).await, StatusCode::OK);
    // A client that trusts only the new certificate gets in.
    assert_eq!(
        session_status(addr, &[&b.der], &cookie).await,
        StatusCode::OK
    );

    assert!(
        proxy
            .json_messages("ERROR", &["server.tls_cert"])
            .is_empty(),
        "{}",
        proxy.log()
    );
    assert!(proxy.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_pair_is_one_error_line_and_the_current_certificate_stays() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let (a, c) = (new_pair(), new_pair());
    let both = [&a.der, &c.der];
    let (dir, mut proxy, addr) = start_binary("tls-reload-bad", &a, &upstream);
    assert!(presented_now(addr, &both).await == a.der);
    let needles = [
        "SIGHUP",
        "server.tls_cert/tls_key",
        "keeping the current certificate",
    ];

    // A garbage certificate (with a valid key): refused, A stays.
    install(&dir, "this is not a certificate\n", &c.key_pem);
    proxy.signal("HUP");
    let errors = proxy.wait_json_messages("ERROR", &needles, 1);
    let error = &errors[0];
    assert!(
        error.contains("cert.pem")
            && error.contains("key.pem")
            && error.contains("no certificate found"),
        "names the keys, the files and the problem: {error}"
    );
    for _ in 0..6 {
        assert!(presented_now(addr, &both).await == a.der, "{}", proxy.log());
    }

    // C's certificate with A's key: refused, A stays.
    install(&dir, &c.cert_pem, &a.key_pem);
    proxy.signal("HUP");
    let errors = proxy.wait_json_messages("ERROR", &needles, 2);
    assert_eq!(errors.len(), 2, "one line per bad reload: {errors:?}");
    assert!(
        errors[1].contains("key.pem") && errors[1].contains("does not match the certificate"),
        "{}",
        errors[1]
    );
    for _ in 0..6 {
        assert!(presented_now(addr, &both).await == a.der, "{}", proxy.log());
    }

    // An expired pair, then one not valid yet (every browser would refuse either): refused,
    // naming the date, A stays.
    for (n, (pair, problem)) in [
        (
            pair_valid(2019, 2020),
            "the certificate expired at 2020-01-01 00:00:00 UTC (notAfter)",
        ),
        (
            pair_valid(2200, 2201),
            "the certificate is not valid before 2200-01-01 00:00:00 UTC (notBefore)",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        install(&dir, &pair.cert_pem, &pair.key_pem);
        proxy.signal("HUP");
        let errors = proxy.wait_json_messages("ERROR", &needles, 3 + n);
        assert!(
            errors[2 + n].contains("cert.pem") && errors[2 + n].contains(problem),
            "{}",
            errors[2 + n]
        );
        for _ in 0..3 {
            assert!(presented_now(addr, &both).await == a.der, "{}", proxy.log());
        }
    }
    // The keyring and users were reloaded each time, on their own.
    assert_eq!(
        proxy
            .json_messages("INFO", &["SIGHUP: reloaded signing.keyring"])
            .len(),
        4,
        "{}",
        proxy.log()
    );
    assert!(proxy.json_messages("INFO", &["server.tls_cert"]).is_empty());

    // A valid pair then loads.
    install(&dir, &c.cert_pem, &c.key_pem);
    proxy.signal("HUP");
    wait_presented(addr, &both, &c.der, || proxy.log()).await;
    let loaded = proxy.wait_json_messages("INFO", &["SIGHUP: reloaded server.tls_cert/tls_key"], 1);
    // rcgen's default validity ends in 4096.
    assert!(
        loaded[0].contains("valid until 4096-01-01 00:00:00 UTC"),
        "{}",
        loaded[0]
    );
    assert_eq!(proxy.json_messages("ERROR", &["server.tls_cert"]).len(), 4);
    assert!(proxy.stop().success());
}

/// An in-process proxy serving HTTPS for `localhost` with the pair at `cert` and `key`.
async fn start_tls_harness(cert: &Path, key: &Path) -> Harness {
    let paths = (cert.to_owned(), key.to_owned());
    Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, _| {
            s.tls = Some(paths);
            s.https = true;
            s.origins = vec!["https://localhost".to_owned()];
            s.public_host = "localhost".to_owned();
        }),
        ..HarnessOptions::default()
    })
    .await
}

/// In-process (`ProxyServer::start_on`, one event loop): after `reload_tls` the new
/// certificate is served with the same ALPN choices (h2 preferred, http/1.1 on request).
#[tokio::test]
async fn http2_is_still_chosen_by_alpn_after_a_reload() {
    let dir = temp_dir("tls-reload-alpn");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (a, b) = (new_pair(), new_pair());
    install_at(&cert, &key, &a);
    let h = start_tls_harness(&cert, &key).await;
    let addr = h.addr;
    assert!(presented_now(addr, &[&a.der]).await == a.der);
    install_at(&cert, &key, &b);

    let loaded = h
        .proxy()
        .reload_tls()
        .expect("TLS is on")
        .expect("a valid pair loads");
    assert!(loaded.starts_with("server.tls_cert/tls_key"), "{loaded}");

    let stream = connect(addr, &[&b.der], &[b"h2", b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, _) = support_h2::client(stream).await;
    let mut login = login_request();
    *login.uri_mut() = "https://localhost/auth/login".parse().unwrap();
    login.headers_mut().remove("host");
    let response = sender.send_request(login).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);

    let stream = connect(addr, &[&b.der], &[b"http/1.1"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    // A bad pair in-process: Err naming the keys, and B stays.
    install_at(
        &cert,
        &key,
        &Pair {
            cert_pem: "garbage".into(),
            ..new_pair()
        },
    );
    let error = h.proxy().reload_tls().unwrap().expect_err("refused");
    assert!(error.contains("server.tls_cert/tls_key"), "{error}");
    assert!(presented_now(addr, &[&b.der]).await == b.der);

    // Without TLS there is nothing to reload.
    let plain = Harness::start().await;
    assert!(plain.proxy().reload_tls().is_none());
}

fn install_at(cert: &Path, key: &Path, pair: &Pair) {
    write(cert, &pair.cert_pem);
    write(key, &pair.key_pem);
}

/// A certificate's SHA-256 fingerprint as openssl prints it (what the reload log line names).
fn sha256_fingerprint(der: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ---------------------------------------------------------------------------------------------
// `server.reload_check_interval`: the same reload, triggered by a change of the files
// ---------------------------------------------------------------------------------------------

/// Checks every second.
const CHECK_EVERY_SECOND: &str = "reload_check_interval = \"1s\"\n";

/// Replaces `path` with `text` at once (a new file renamed over it), so a check never reads it
/// half-written: the tests count error lines.
fn replace(path: &Path, text: &str) {
    let staged = path.with_extension("new");
    write(&staged, text);
    std::fs::rename(&staged, path).unwrap();
}

/// A renewed certificate is served without a signal; a pair caught half-written (the new
/// certificate, the old key) is one error line, the current certificate stays, and the key's
/// arrival at the next check completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_pair_is_served_without_a_signal_and_a_half_written_one_waits() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let (a, b, c) = (new_pair(), new_pair(), new_pair());
    let all = [&a.der, &b.der, &c.der];
    let dir = temp_dir("tls-reload-check");
    install(&dir, &a.cert_pem, &a.key_pem);
    let (mut proxy, addr) = start_binary_in(&dir, &upstream, CHECK_EVERY_SECOND);
    assert!(presented_now(addr, &all).await == a.der);

    // Both files at once.
    replace(&dir.join("cert.pem"), &b.cert_pem);
    replace(&dir.join("key.pem"), &b.key_pem);
    wait_presented(addr, &all, &b.der, || proxy.log()).await;
    let loaded = proxy.wait_json_messages(
        "INFO",
        &["file change: reloaded server.tls_cert/tls_key"],
        1,
    );
    assert!(
        loaded.last().unwrap().contains(&sha256_fingerprint(&b.der)),
        "{loaded:?}"
    );

    // The certificate first; the key only after a check has seen the mismatch.
    let needles = [
        "file change: server.tls_cert/tls_key not reloaded",
        "keeping the current certificate",
    ];
    // (A check between the two renames above may have caught B's certificate with A's key.)
    let earlier = proxy.json_messages("ERROR", &needles).len();
    replace(&dir.join("cert.pem"), &c.cert_pem);
    let errors = proxy.wait_json_messages("ERROR", &needles, earlier + 1);
    assert!(
        errors[earlier].contains("does not match the certificate"),
        "{errors:?}"
    );
    for _ in 0..6 {
        assert!(presented_now(addr, &all).await == b.der, "{}", proxy.log());
    }
    // Unchanged since: not logged again at every check.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        proxy.json_messages("ERROR", &needles).len(),
        earlier + 1,
        "{}",
        proxy.log()
    );
    replace(&dir.join("key.pem"), &c.key_pem);
    wait_presented(addr, &all, &c.der, || proxy.log()).await;

    // Only the TLS pair changed: the keyring and users were not reloaded; no signal was sent.
    let log = proxy.log();
    assert!(
        proxy.json_messages("INFO", &["signing.keyring"]).is_empty(),
        "{log}"
    );
    assert!(!log.contains("SIGHUP:"), "no signal was sent: {log}");
    assert!(proxy.stop().success());
}

/// cert-manager's renewal as a Kubernetes Secret volume sees it: `cert.pem` and `key.pem` are
/// symlinks into `..data`, which the kubelet repoints atomically to a new folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_swapped_by_symlink_is_served_without_a_signal() {
    let upstream = start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await;
    let (a, b) = (new_pair(), new_pair());
    let both = [&a.der, &b.der];
    let dir = temp_dir("tls-reload-check-symlink");
    let volume = |version: &str, pair: &Pair| {
        let data = dir.join(format!("..{version}"));
        install(&data, &pair.cert_pem, &pair.key_pem);
        let staged = dir.join("..data_tmp");
        std::os::unix::fs::symlink(format!("..{version}"), &staged).unwrap();
        std::fs::rename(&staged, dir.join("..data")).unwrap();
    };
    volume("v1", &a);
    for name in ["cert.pem", "key.pem"] {
        std::os::unix::fs::symlink(Path::new("..data").join(name), dir.join(name)).unwrap();
    }
    let (mut proxy, addr) = start_binary_in(&dir, &upstream, CHECK_EVERY_SECOND);
    assert!(presented_now(addr, &both).await == a.der);

    volume("v2", &b);
    wait_presented(addr, &both, &b.der, || proxy.log()).await;
    proxy.wait_json_messages(
        "INFO",
        &["file change: reloaded server.tls_cert/tls_key"],
        1,
    );
    assert!(proxy.stop().success());
}

/// `countersign_tls_cert_expiry_timestamp_seconds`: the `notAfter` of the certificate served
/// now, from the start, following each reload that swapped one in and not one that failed;
/// no series without TLS. What an operator alerts on before browsers refuse the certificate.
#[tokio::test]
async fn the_served_certificates_expiry_is_a_gauge() {
    const NAME: &str = "countersign_tls_cert_expiry_timestamp_seconds";
    let value = |h: &Harness| {
        let text = h.proxy().state().metrics().render(None, &[]);
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{NAME} ")))
            .map(|v| v.parse::<i64>().unwrap())
    };
    let dir = temp_dir("tls-expiry-gauge");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    install_at(&cert, &key, &new_pair());
    let h = start_tls_harness(&cert, &key).await;
    // rcgen's default notAfter: 4096-01-01 00:00:00 UTC.
    assert_eq!(value(&h), Some(67_090_118_400));
    install_at(&cert, &key, &pair_valid(2020, 2300));
    let loaded = h.proxy().reload_tls().unwrap().unwrap();
    assert!(
        loaded.contains("valid until 2300-01-01 00:00:00 UTC"),
        "{loaded}"
    );
    assert_eq!(value(&h), Some(10_413_792_000));
    // A failed reload (an expired pair) keeps the current certificate, and its gauge.
    install_at(&cert, &key, &pair_valid(2019, 2020));
    let failed = h.proxy().reload_tls().unwrap().unwrap_err();
    assert!(failed.contains("expired at 2020-01-01"), "{failed}");
    assert_eq!(value(&h), Some(10_413_792_000));
    // Without TLS: no series (not a 0 that would read as "expired in 1970").
    let plain = Harness::start().await;
    assert_eq!(value(&plain), None);
    assert!(!plain
        .proxy()
        .state()
        .metrics()
        .render(None, &[])
        .contains(NAME));
}

//! `countersign check-config --online` and mutual TLS: an https upstream (or `auth.verify_url`)
//! that will refuse the proxy's client certificate fails the check, whatever the TLS version.
//! With TLS 1.3 the server checks the client's certificate after the client considers the
//! handshake done, and refuses with an alert the client only sees when it reads: the check
//! reads (sending nothing) for a short bounded time after a TLS 1.3 handshake. A session ticket
//! ends that wait at once; a server that sends none passes after it. No request is ever sent.
//!
//! Real servers on loopback: tokio-rustls with a `WebPkiClientVerifier` (it REQUIRES a client
//! certificate from its client CA), TLS 1.3 only or TLS 1.2 only, with or without session
//! tickets; certificates made here with rcgen. Each server counts the handshakes it accepted
//! and refused and the bytes that arrived after a handshake (a request would).
//! Run: `cargo test --all-features --test proxy_preflight_mtls`.
#![cfg(feature = "proxy")]

mod support;
mod support_certs;
mod support_cli;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivateKeyDer;
use support::{keyring_file_text, temp_dir, users_file_text, write, TestDir};
use support_certs::{issue, new_ca, Ca, Leaf};
use support_cli::{run_countersign, Checked};
use tokio::io::AsyncReadExt as _;

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// The upstream's server CA and certificate (for 127.0.0.1), the client CA it trusts (X), and
/// a client certificate from X and one from another CA (Y).
struct Pki {
    server_ca: Ca,
    server: Leaf,
    client_ca: Ca,
    right: Leaf,
    wrong: Leaf,
}

fn new_pki() -> Pki {
    let server_ca = new_ca("upstream server CA");
    let server = issue(&server_ca, "127.0.0.1", false);
    let client_ca = new_ca("mesh client CA X");
    let right = issue(&client_ca, "proxy", true);
    let wrong = issue(&new_ca("other client CA Y"), "proxy", true);
    Pki {
        server_ca,
        server,
        client_ca,
        right,
        wrong,
    }
}

// ---------------------------------------------------------------------------------------------
// The upstream: TLS that requires a client certificate from its client CA
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Tls {
    /// TLS 1.3 only, `tickets` session tickets after the handshake (rustls' default: 2).
    V13 { tickets: usize },
    /// TLS 1.2 only: the client certificate is checked inside the handshake.
    V12,
}

struct MtlsServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    refused: Arc<AtomicUsize>,
    /// Bytes that arrived after an accepted handshake (a request would).
    received: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MtlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MtlsServer {
    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }
}

async fn start_mtls_server(pki: &Pki, tls: Tls) -> MtlsServer {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.client_ca.cert.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let key = PrivateKeyDer::from_pem_slice(pki.server.key_pem.as_bytes()).unwrap();
    let versions: &[&rustls::SupportedProtocolVersion] = match tls {
        Tls::V13 { .. } => &[&rustls::version::TLS13],
        Tls::V12 => &[&rustls::version::TLS12],
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![pki.server.der.clone()], key)
        .unwrap();
    if let Tls::V13 { tickets } = tls {
        config.send_tls13_tickets = tickets;
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(AtomicUsize::new(0));
    let counts = (accepted.clone(), refused.clone(), received.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let (accepted, refused, received) = counts.clone();
            tokio::spawn(async move {
                // A refused handshake: tokio-rustls sends the alert before returning the error.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    refused.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    received.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    MtlsServer {
        addr,
        accepted,
        refused,
        received,
        task,
    }
}

// ---------------------------------------------------------------------------------------------
// The config and the check
// ---------------------------------------------------------------------------------------------

/// Which client certificate a config presents.
#[derive(Clone, Copy)]
enum Present {
    Right,
    Wrong,
    None,
}

/// Writes the client certificate `present` names into `dir` as `<name>.pem`/`<name>.key` and
/// returns the config lines naming them (`cert_key`/`key_key` are the keys' names).
fn client_cert_lines(
    dir: &Path,
    pki: &Pki,
    present: Present,
    name: &str,
    keys: (&str, &str),
) -> String {
    let leaf = match present {
        Present::Right => &pki.right,
        Present::Wrong => &pki.wrong,
        Present::None => return String::new(),
    };
    write(&dir.join(format!("{name}.pem")), &leaf.cert_pem);
    write(&dir.join(format!("{name}.key")), &leaf.key_pem);
    format!("{} = \"{name}.pem\"\n{} = \"{name}.key\"\n", keys.0, keys.1)
}

/// A config directory: one `[[upstream]]` per entry of `upstreams` (https, the server CA as
/// `ca_file`, the client certificate given), and `verify_url` at `verify` if given (same CA,
/// its own client certificate).
fn config_dir(
    tag: &str,
    pki: &Pki,
    upstreams: &[(&MtlsServer, Present)],
    verify: Option<(&MtlsServer, Present)>,
) -> (TestDir, PathBuf) {
    let dir = temp_dir(&format!("preflight-mtls-{tag}"));
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    write(&dir.join("server-ca.pem"), &pki.server_ca.cert.pem());
    // verify_url replaces the users file.
    let auth = match verify {
        None => "users_file = \"users.toml\"\n".to_owned(),
        Some((server, present)) => format!(
            "verify_url = \"{}/verify\"\nverify_ca_file = \"server-ca.pem\"\n{}",
            server.url(),
            client_cert_lines(
                &dir,
                pki,
                present,
                "login",
                ("verify_client_cert_file", "verify_client_key_file")
            )
        ),
    };
    let mut tables = String::new();
    for (i, (server, present)) in upstreams.iter().enumerate() {
        tables.push_str(&format!(
            "[[upstream]]\nname = \"api{i}\"\nprefix = \"/api{i}/\"\nurl = \"{}\"\n\
             ca_file = \"server-ca.pem\"\n{}\n",
            server.url(),
            client_cert_lines(
                &dir,
                pki,
                *present,
                &format!("client{i}"),
                ("client_cert_file", "client_key_file")
            )
        ));
    }
    let config = dir.join("proxy.toml");
    write(
        &config,
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\npublic_origin = \"http://app.test\"\n\
             [session]\nstore = \"memory\"\n[auth]\n{auth}\n[signing]\nkeyring = \"keys.toml\"\n\
             {tables}"
        ),
    );
    (dir, config)
}

/// `countersign check-config --online --config <config>`, off the test's runtime (its servers
/// keep answering meanwhile).
async fn check_online(config: &Path) -> Checked {
    let args = vec![
        "check-config".to_owned(),
        "--online".to_owned(),
        "--config".to_owned(),
        config.display().to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || run_countersign(&args, b""))
        .await
        .unwrap();
    Checked::from(output)
}

#[track_caller]
fn assert_line(run: &Checked, key: &str, status: &str, needles: &[&str]) {
    let line = run.line(key);
    assert!(line.starts_with(status), "{status}: {line}\n{run}");
    for needle in needles {
        assert!(line.contains(needle), "{needle:?} in {line}\n{run}");
    }
}

/// `count` reaches `expected` (the server counts a handshake just after its last message, which
/// the check may have read already), and not more.
async fn assert_count(count: &AtomicUsize, expected: usize) {
    support::eventually(std::time::Duration::from_secs(5), || {
        count.load(Ordering::SeqCst) >= expected
    })
    .await;
    assert_eq!(count.load(Ordering::SeqCst), expected);
}

/// Nothing but handshakes reached the server: no request, no login.
#[track_caller]
fn assert_nothing_sent(server: &MtlsServer) {
    assert_eq!(
        server.received.load(Ordering::SeqCst),
        0,
        "bytes after a handshake"
    );
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// (a) A TLS 1.3 upstream requiring a client certificate from CA X: a config presenting one
/// from CA Y, or none, fails the check (exit 1), the line naming the upstream, the key of the
/// client certificate and the alert; the same for `verify_url`. The handshake itself completes
/// on the client's side in each case (the refusal comes after it), and nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls13_upstream_refusing_the_client_certificate_fails_the_check() {
    let pki = new_pki();
    let server = start_mtls_server(&pki, Tls::V13 { tickets: 2 }).await;
    let (_dir, config) = config_dir(
        "tls13-refused",
        &pki,
        &[(&server, Present::Wrong), (&server, Present::None)],
        Some((&server, Present::Wrong)),
    );
    let run = check_online(&config).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert_line(
        &run,
        "upstream[0].url",
        "FAIL",
        &[
            &format!("(api0) {}", server.url()),
            "refused the client certificate (upstream[0].client_cert_file)",
            "received fatal alert: UnknownCA",
        ],
    );
    assert_line(
        &run,
        "upstream[1].url",
        "FAIL",
        &[
            &format!("(api1) {}", server.url()),
            "refused the connection before any request",
            "received fatal alert: CertificateRequired",
            "set upstream[1].client_cert_file",
        ],
    );
    assert_line(
        &run,
        "auth.verify_url",
        "FAIL",
        &[
            "refused the client certificate (auth.verify_client_cert_file)",
            "received fatal alert: UnknownCA",
        ],
    );
    assert!(run.stderr.contains("3 of 3 online checks failed"), "{run}");
    assert_count(&server.refused, 3).await;
    assert_count(&server.accepted, 0).await;
    assert_nothing_sent(&server);
}

/// (b) The same upstream with the right certificate passes, and fast: its session ticket ends
/// the wait. `verify_url` keeps its promise: no login sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls13_upstream_accepting_the_client_certificate_passes() {
    let pki = new_pki();
    let server = start_mtls_server(&pki, Tls::V13 { tickets: 2 }).await;
    let (_dir, config) = config_dir(
        "tls13-accepted",
        &pki,
        &[(&server, Present::Right)],
        Some((&server, Present::Right)),
    );
    let run = check_online(&config).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert_line(
        &run,
        "upstream[0].url",
        "ok",
        &[
            "TLS handshake ok",
            "TLS 1.3",
            "accepted (the upstream sent a session ticket)",
        ],
    );
    assert_line(
        &run,
        "auth.verify_url",
        "ok",
        &["session ticket", "(no login sent)"],
    );
    assert!(
        run.stdout
            .contains("online checks ok (2 checks, 0 warnings)"),
        "{run}"
    );
    assert_count(&server.accepted, 2).await;
    assert_count(&server.refused, 0).await;
    assert_nothing_sent(&server);
}

/// A TLS 1.3 upstream that sends no session ticket: with the right certificate the check
/// passes once the bounded wait is over without a refusal (and says how long it waited, at
/// most 750 ms); with the wrong one the alert still arrives within the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_session_tickets_the_bounded_wait_decides() {
    let pki = new_pki();
    let server = start_mtls_server(&pki, Tls::V13 { tickets: 0 }).await;
    let (_dir, config) = config_dir(
        "tls13-no-tickets",
        &pki,
        &[(&server, Present::Right), (&server, Present::Wrong)],
        None,
    );
    let started = std::time::Instant::now();
    let run = check_online(&config).await;
    let took = started.elapsed();
    assert_eq!(run.code, Some(1), "{run}");
    assert_line(
        &run,
        "upstream[0].url",
        "ok",
        &["TLS handshake ok", "TLS 1.3", "no refusal within"],
    );
    let waited: u64 = run
        .line("upstream[0].url")
        .split("no refusal within ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|ms| ms.parse().ok())
        .expect("the wait in ms");
    assert!((300..=750).contains(&waited), "waited {waited} ms\n{run}");
    assert!(took >= std::time::Duration::from_millis(300), "{took:?}");
    assert_line(
        &run,
        "upstream[1].url",
        "FAIL",
        &[
            "refused the client certificate (upstream[1].client_cert_file)",
            "received fatal alert: UnknownCA",
        ],
    );
    assert_count(&server.accepted, 1).await;
    assert_count(&server.refused, 1).await;
    assert_nothing_sent(&server);
}

/// (c) A TLS 1.2-only upstream checks the client certificate inside the handshake: the wrong
/// one (or none) fails, as it always did; the right one passes without any wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls12_upstream_refusing_the_client_certificate_still_fails() {
    let pki = new_pki();
    let server = start_mtls_server(&pki, Tls::V12).await;
    let (_dir, config) = config_dir(
        "tls12",
        &pki,
        &[
            (&server, Present::Wrong),
            (&server, Present::None),
            (&server, Present::Right),
        ],
        None,
    );
    let run = check_online(&config).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert_line(
        &run,
        "upstream[0].url",
        "FAIL",
        &["received fatal alert: UnknownCA"],
    );
    assert_line(&run, "upstream[1].url", "FAIL", &["received fatal alert"]);
    let right = run.line("upstream[2].url");
    assert!(right.starts_with("ok"), "{run}");
    assert!(right.contains("TLS handshake ok"), "{run}");
    assert!(!right.contains("TLS 1.3"), "{run}");
    assert!(run.stderr.contains("2 of 3 online checks failed"), "{run}");
    assert_count(&server.accepted, 1).await;
    assert_nothing_sent(&server);
}

//! Mutual TLS from the proxy to its upstreams: `[[upstream]] client_cert_file` /
//! `client_key_file` and `[auth] verify_client_cert_file` / `verify_client_key_file`.
//!
//! A real TLS upstream on loopback (tokio-rustls with a `WebPkiClientVerifier`: it REQUIRES a
//! client certificate from its client CA) and certificates made here with rcgen (and openssl
//! for the SEC1 and PKCS#1 key encodings): a proxied request arrives with the configured
//! client certificate, and signed; without one, or with one the upstream's CA does not trust,
//! the browser gets 502 `bad_gateway` (the log names the TLS alert) and the upstream refused
//! the handshake. RSA, ECDSA and Ed25519 keys in PKCS#8, SEC1 and PKCS#1. Every config problem
//! (both-or-neither, http://, missing/unreadable/not-PEM files, a key of another certificate,
//! an expired certificate, an encrypted key) is an error naming the file, the key and the
//! problem, from config loading, `check-config` (the binary) and `run` alike. Reload: SIGHUP
//! and a file change (the binary) and `ProxyConfig::reload_client_certs` give new connections
//! the new certificate (TLS resumption would keep the old one: it is off with a client
//! certificate); a bad pair keeps the current one. The key never shows in `Debug` or messages.
//! Run: `cargo test --all-features --test proxy_upstream_mtls`.
#![cfg(feature = "proxy")]

mod support;
mod support_certs;
mod support_run;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use countersign::proxy::config::ProxyConfig;
use countersign::proxy::server::{ProxyDeps, ProxyServer, ProxySettings};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rcgen::{KeyPair, SignatureAlgorithm};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::*;
use support_certs::*;
use support_run::*;

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

fn client_leaf(ca: &Ca, name: &str, alg: &'static SignatureAlgorithm) -> Leaf {
    issue_with(ca, name, KeyPair::generate_for(alg).unwrap(), true, None)
}

/// A PKCS#8 key in its "traditional" encoding: SEC1 for EC, PKCS#1 for RSA.
fn traditional(pkcs8_pem: &str) -> String {
    openssl(&["pkey", "-traditional"], pkcs8_pem)
}

// ---------------------------------------------------------------------------------------------
// The upstream: TLS that requires a client certificate from its client CA
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    /// The client certificate of the connection (DER).
    peer: Option<Vec<u8>>,
    signed: bool,
}

struct MtlsUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Handshakes the upstream refused (no client certificate, or one it does not trust).
    refused: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MtlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MtlsUpstream {
    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    fn last(&self) -> Seen {
        self.seen.lock().last().cloned().expect("a request arrived")
    }
}

/// Serves https on loopback with `server` (for 127.0.0.1), accepting only clients with a
/// certificate issued by `client_ca`. Answers `POST /verify` as a `verify_url` accepting any
/// credentials (user "vera"), anything else 200 "ok".
async fn start_mtls_upstream(server: &Leaf, client_ca: &Ca) -> MtlsUpstream {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(client_ca.cert.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server.der.clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(AtomicUsize::new(0));
    let (seen_log, refused_count) = (seen.clone(), refused.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, seen, refused) =
                (acceptor.clone(), seen_log.clone(), refused_count.clone());
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(_) => {
                        refused.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|c| c.to_vec());
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    let peer = peer.clone();
                    async move {
                        seen.lock().push(Seen {
                            path: req.uri().path().to_owned(),
                            peer,
                            signed: req.headers().contains_key("signature")
                                && req.headers().contains_key("signature-input"),
                        });
                        let body = if req.uri().path() == "/verify" {
                            r#"{"user":"vera","roles":["auditor"]}"#
                        } else {
                            "ok"
                        };
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(body.as_bytes())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    MtlsUpstream {
        addr,
        seen,
        refused,
        task,
    }
}

/// The usual pair of CAs: one issues the upstream's server certificate, the other the
/// proxy's client certificates (the upstream trusts only that one for clients).
struct Pki {
    server_ca: Ca,
    client_ca: Ca,
    server: Leaf,
}

fn new_pki() -> Pki {
    let server_ca = new_ca("upstream server CA");
    let client_ca = new_ca("mesh client CA");
    let server = issue(&server_ca, "127.0.0.1", false);
    Pki {
        server_ca,
        client_ca,
        server,
    }
}

// ---------------------------------------------------------------------------------------------
// The proxy, from a config file
// ---------------------------------------------------------------------------------------------

/// A folder with keys.toml, users.toml, `server-ca.pem` (the upstream's CA) and `proxy.toml`:
/// `[server]` on `listen`, `[auth]` = `auth`, one `[[upstream]]` at `url` (public, with
/// `ca_file` over https) and `extra` lines.
fn config_dir(tag: &str, pki: &Pki, listen: &str, auth: &str, url: &str, extra: &str) -> TestDir {
    let dir = temp_dir(tag);
    let ca = if url.starts_with("https://") {
        "ca_file = \"server-ca.pem\"\n"
    } else {
        ""
    };
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    write(&dir.join("server-ca.pem"), &pki.server_ca.cert.pem());
    write(
        &dir.join("proxy.toml"),
        &format!(
            "[server]\nlisten = \"{listen}\"\npublic_origin = \"{ORIGIN}\"\n\n\
             [signing]\nkeyring = \"keys.toml\"\n\n[auth]\n{auth}\n\n\
             [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"{url}\"\nauth = \"none\"\n\
             {ca}{extra}\n"
        ),
    );
    dir
}

const USERS: &str = "users_file = \"users.toml\"";
/// Every request on a new connection, so a reload shows at the next request.
const FRESH: &str = "pool_max_idle_per_host = 0";
const CLIENT_FILES: &str = "client_cert_file = \"client.pem\"\nclient_key_file = \"client.key\"";

fn install(dir: &Path, cert_pem: &str, key_pem: &str) {
    write(&dir.join("client.pem"), cert_pem);
    write(&dir.join("client.key"), key_pem);
}

struct Running {
    proxy: ProxyServer,
    config: ProxyConfig,
}

async fn start_proxy(dir: &Path, extra_roots: Vec<CertificateDer<'static>>) -> Running {
    let config = ProxyConfig::load(&dir.join("proxy.toml")).expect("config loads");
    config.check_files().expect("check-config passes");
    let mut settings = ProxySettings::from_config(&config).expect("settings");
    settings.upstream_roots = extra_roots;
    let deps = ProxyDeps::from_config_system_clock(&config).expect("deps");
    let proxy = ProxyServer::start(settings, deps)
        .await
        .expect("proxy starts");
    Running { proxy, config }
}

async fn get_api(addr: SocketAddr) -> Reply {
    send(addr, Method::GET, "/api/x", &[], Bytes::new()).await
}

/// `config_dir` (as `tag`, on 127.0.0.1:0, `[auth]` = `USERS`) with `cert_pem`/`key_pem`
/// installed as the client pair, started in-process.
async fn start_with_client(
    tag: &str,
    pki: &Pki,
    url: &str,
    extra: &str,
    cert_pem: &str,
    key_pem: &str,
) -> (TestDir, Running) {
    let dir = config_dir(tag, pki, "127.0.0.1:0", USERS, url, extra);
    install(&dir, cert_pem, key_pem);
    let running = start_proxy(&dir, Vec::new()).await;
    (dir, running)
}

/// [`start_with_client`] with `CLIENT_FILES` and `leaf`'s pair, for `upstream`.
async fn start_presenting(
    tag: &str,
    pki: &Pki,
    upstream: &MtlsUpstream,
    leaf: &Leaf,
) -> (TestDir, Running) {
    let url = upstream.url();
    start_with_client(tag, pki, &url, CLIENT_FILES, &leaf.cert_pem, &leaf.key_pem).await
}

/// The binary on free ports from `config_dir`'s files (`[auth]` = `USERS`, `extra`) in a
/// folder of its own (returned first, so that it is dropped after the binary), with `client`'s pair installed when given and
/// `[server] reload_check_interval` when given; waits until it listens.
fn spawn_binary(
    tag: &str,
    pki: &Pki,
    url: &str,
    extra: &str,
    client: Option<&Leaf>,
    reload_check_interval: Option<&str>,
    args: &[&str],
) -> (TestDir, RunningProxy, SocketAddr) {
    let dir = temp_dir(tag);
    let (mut proxy, addr, _) = start_on_free_ports(|listen, _| {
        let made = config_dir(
            &format!("{tag}-cfg"),
            pki,
            &listen.to_string(),
            USERS,
            url,
            extra,
        );
        let mut text = std::fs::read_to_string(made.join("proxy.toml")).unwrap();
        if let Some(interval) = reload_check_interval {
            // `[server] reload_check_interval`, right after `listen`.
            text = text.replacen(
                &format!("listen = \"{listen}\"\n"),
                &format!("listen = \"{listen}\"\nreload_check_interval = \"{interval}\"\n"),
                1,
            );
            assert!(text.contains("reload_check_interval"), "{text}");
        }
        write(&dir.join("proxy.toml"), &text);
        for name in ["keys.toml", "users.toml", "server-ca.pem"] {
            std::fs::copy(made.join(name), dir.join(name)).unwrap();
        }
        if let Some(leaf) = client {
            install(&dir, &leaf.cert_pem, &leaf.key_pem);
        }
        RunningProxy::spawn(&dir.join("proxy.toml"), args)
    });
    proxy.wait_listening(addr);
    (dir, proxy, addr)
}

/// A request through the proxy at `addr` is answered 200 and reached `upstream` over a
/// connection that presented `leaf`'s certificate; `log` is shown when it is not.
async fn assert_presents(
    addr: SocketAddr,
    upstream: &MtlsUpstream,
    leaf: &Leaf,
    log: impl Fn() -> String,
) {
    assert_eq!(get_api(addr).await.status, StatusCode::OK, "{}", log());
    assert_eq!(upstream.last().peer.as_deref(), Some(leaf.der.as_ref()));
}

/// The browser got 502 `bad_gateway`.
fn assert_bad_gateway(r: &Reply) {
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    assert_eq!(r.json()["error"], "bad_gateway");
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_upstream_sees_the_configured_client_certificate_and_the_signature() {
    let pki = new_pki();
    let upstream = start_mtls_upstream(&pki.server, &pki.client_ca).await;
    let client = client_leaf(&pki.client_ca, "proxy-a", &rcgen::PKCS_ECDSA_P256_SHA256);
    let (_dir, running) = start_presenting("mtls-ok", &pki, &upstream, &client).await;
    let r = get_api(running.proxy.local_addr()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = upstream.last();
    assert_eq!(seen.path, "/api/x");
    assert_eq!(seen.peer.as_deref(), Some(client.der.as_ref()));
    assert!(
        seen.signed,
        "mTLS authenticates the transport, HMAC each request"
    );
    assert_eq!(upstream.refused.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn without_a_client_certificate_or_with_an_untrusted_one_the_answer_is_502() {
    let pki = new_pki();
    let upstream = start_mtls_upstream(&pki.server, &pki.client_ca).await;

    // No client certificate configured: the upstream refuses the handshake.
    let dir = config_dir("mtls-none", &pki, "127.0.0.1:0", USERS, &upstream.url(), "");
    let running = start_proxy(&dir, Vec::new()).await;
    assert_bad_gateway(&get_api(running.proxy.local_addr()).await);
    assert_eq!(upstream.refused.load(Ordering::SeqCst), 1);
    assert!(upstream.seen.lock().is_empty());

    // A certificate from a CA the upstream does not trust.
    let stranger = new_ca("some other CA");
    let client = client_leaf(&stranger, "proxy-x", &rcgen::PKCS_ECDSA_P256_SHA256);
    let (_dir, running) = start_presenting("mtls-untrusted", &pki, &upstream, &client).await;
    assert_bad_gateway(&get_api(running.proxy.local_addr()).await);
    assert_eq!(upstream.refused.load(Ordering::SeqCst), 2);
    assert!(upstream.seen.lock().is_empty());
}

/// What the operator sees when the upstream refuses: a log line naming the upstream and the
/// TLS alert (the browser gets only the stable code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_handshake_is_logged_with_the_tls_alert() {
    let pki = new_pki();
    let upstream = start_mtls_upstream(&pki.server, &pki.client_ca).await;
    let (_dir, mut proxy, addr) =
        spawn_binary("mtls-refused", &pki, &upstream.url(), "", None, None, &[]);
    assert_bad_gateway(&get_api(addr).await);
    // "bad_gateway: upstream api: connection error: received fatal alert: CertificateRequired"
    proxy.wait_json_messages(
        "WARN",
        &[
            "bad_gateway: upstream api",
            "fatal alert: CertificateRequired",
        ],
        1,
    );
    assert!(proxy.stop().success());
}

#[tokio::test]
async fn rsa_ecdsa_and_ed25519_keys_in_pkcs8_sec1_and_pkcs1_all_work() {
    let pki = new_pki();
    let upstream = start_mtls_upstream(&pki.server, &pki.client_ca).await;
    let p256 = client_leaf(&pki.client_ca, "p256", &rcgen::PKCS_ECDSA_P256_SHA256);
    let p384 = client_leaf(&pki.client_ca, "p384", &rcgen::PKCS_ECDSA_P384_SHA384);
    let ed25519 = client_leaf(&pki.client_ca, "ed25519", &rcgen::PKCS_ED25519);
    let rsa_pkcs8 = openssl(
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        "",
    );
    let rsa = issue_with(
        &pki.client_ca,
        "rsa",
        KeyPair::from_pem(&rsa_pkcs8).unwrap(),
        true,
        None,
    );
    let cases = [
        (
            "p256 pkcs8",
            &p256,
            p256.key_pem.clone(),
            "BEGIN PRIVATE KEY",
        ),
        (
            "p256 sec1",
            &p256,
            traditional(&p256.key_pem),
            "BEGIN EC PRIVATE KEY",
        ),
        (
            "p384 sec1",
            &p384,
            traditional(&p384.key_pem),
            "BEGIN EC PRIVATE KEY",
        ),
        (
            "ed25519 pkcs8",
            &ed25519,
            ed25519.key_pem.clone(),
            "BEGIN PRIVATE KEY",
        ),
        ("rsa pkcs8", &rsa, rsa_pkcs8.clone(), "BEGIN PRIVATE KEY"),
        (
            "rsa pkcs1",
            &rsa,
            traditional(&rsa_pkcs8),
            "BEGIN RSA PRIVATE KEY",
        ),
    ];
    for (what, leaf, key_pem, label) in cases {
        assert!(key_pem.contains(label), "{what}: {key_pem:.40}");
        let (_dir, running) = start_with_client(
            "mtls-keys",
            &pki,
            &upstream.url(),
            CLIENT_FILES,
            &leaf.cert_pem,
            &key_pem,
        )
        .await;
        let r = get_api(running.proxy.local_addr()).await;
        assert_eq!(r.status, StatusCode::OK, "{what}: {}", r.text());
        assert_eq!(
            upstream.last().peer.as_deref(),
            Some(leaf.der.as_ref()),
            "{what}"
        );
    }
}

#[tokio::test]
async fn verify_url_presents_its_own_client_certificate() {
    let pki = new_pki();
    let upstream = start_mtls_upstream(&pki.server, &pki.client_ca).await;
    let login_cert = client_leaf(&pki.client_ca, "proxy-login", &rcgen::PKCS_ED25519);
    let verify_url = format!("{}/verify", upstream.url());
    // verify_url's CA is a private one, trusted through verify_ca_file (config only: no roots
    // given to the proxy any other way).
    let auth = format!(
        "verify_url = \"{verify_url}\"\nverify_client_cert_file = \"login.pem\"\n\
         verify_client_key_file = \"login.key\"\nverify_ca_file = \"server-ca.pem\""
    );
    let dir = config_dir(
        "mtls-verify",
        &pki,
        "127.0.0.1:0",
        &auth,
        &upstream.url(),
        "",
    );
    write(&dir.join("login.pem"), &login_cert.cert_pem);
    write(&dir.join("login.key"), &login_cert.key_pem);
    let running = start_proxy(&dir, Vec::new()).await;
    let r = login_at(running.proxy.local_addr(), "vera", "vera-pw").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let seen = upstream.last();
    assert_eq!(seen.path, "/verify");
    assert_eq!(seen.peer.as_deref(), Some(login_cert.der.as_ref()));
    assert!(seen.signed);

    // Without the client certificate: the login is a 502 (never a silent refusal).
    let dir = config_dir(
        "mtls-verify-none",
        &pki,
        "127.0.0.1:0",
        &format!("verify_url = \"{verify_url}\"\nverify_ca_file = \"server-ca.pem\""),
        &upstream.url(),
        "",
    );
    let running = start_proxy(&dir, Vec::new()).await;
    assert_bad_gateway(&login_at(running.proxy.local_addr(), "vera", "vera-pw").await);

    // Without verify_ca_file: the private CA is not trusted, so the login is a 502 too,
    // although the client certificate is right.
    let dir = config_dir(
        "mtls-verify-no-ca",
        &pki,
        "127.0.0.1:0",
        &auth.replace("verify_ca_file = \"server-ca.pem\"", ""),
        &upstream.url(),
        "",
    );
    write(&dir.join("login.pem"), &login_cert.cert_pem);
    write(&dir.join("login.key"), &login_cert.key_pem);
    let running = start_proxy(&dir, Vec::new()).await;
    assert_bad_gateway(&login_at(running.proxy.local_addr(), "vera", "vera-pw").await);
}

/// `auth.verify_ca_file`: only with an https `verify_url`, and a file that is a PEM bundle of
/// usable CA certificates; each error names the key.
#[test]
fn verify_ca_file_is_checked() {
    let pki = new_pki();
    let config = |tag: &str, auth: &str| {
        config_dir(tag, &pki, "127.0.0.1:0", auth, "http://127.0.0.1:9", "")
    };
    let dir = config(
        "verify-ca-http",
        "verify_url = \"http://127.0.0.1:9/v\"\nverify_ca_file = \"server-ca.pem\"",
    );
    let err = ProxyConfig::load(&dir.join("proxy.toml")).unwrap_err();
    assert_eq!(err.key(), "auth.verify_ca_file", "{err}");
    assert!(
        err.to_string().contains("only used with an https://"),
        "{err}"
    );
    let dir = config(
        "verify-ca-none",
        &format!("{USERS}\nverify_ca_file = \"server-ca.pem\""),
    );
    let err = ProxyConfig::load(&dir.join("proxy.toml")).unwrap_err();
    assert_eq!(err.key(), "auth.verify_ca_file", "{err}");
    let dir = config(
        "verify-ca-bad",
        "verify_url = \"https://127.0.0.1:9/v\"\nverify_ca_file = \"bad.pem\"",
    );
    write(&dir.join("bad.pem"), "not a certificate\n");
    let config = ProxyConfig::load(&dir.join("proxy.toml")).expect("the keys are right");
    let err = ProxySettings::from_config(&config).unwrap_err();
    assert!(
        err.contains("auth.verify_ca_file")
            && err.contains("bad.pem")
            && err.contains("no certificate found"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_countersign"))
        .args(["check-config", "--config"])
        .arg(dir.join("proxy.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.verify_ca_file"));
}

// ---------------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------------

/// What the reload tests share: the PKI, its upstream, two client certificates for the proxy
/// (A, ECDSA P-256, and B, `b_alg`) and the `[[upstream]]` lines naming the client files with
/// a new connection for every request (so a reload shows at the next one).
struct Rotation {
    pki: Pki,
    upstream: MtlsUpstream,
    a: Leaf,
    b: Leaf,
    extra: String,
}

async fn rotation(b_alg: &'static SignatureAlgorithm) -> Rotation {
    let pki = new_pki();
    let upstream = start_mtls_upstream(&pki.server, &pki.client_ca).await;
    let a = client_leaf(&pki.client_ca, "proxy-a", &rcgen::PKCS_ECDSA_P256_SHA256);
    let b = client_leaf(&pki.client_ca, "proxy-b", b_alg);
    Rotation {
        pki,
        upstream,
        a,
        b,
        extra: format!("{CLIENT_FILES}\n{FRESH}"),
    }
}

impl Rotation {
    /// [`spawn_binary`] with these `[[upstream]]` lines and A installed.
    fn spawn(
        &self,
        tag: &str,
        reload_check_interval: Option<&str>,
        args: &[&str],
    ) -> (TestDir, RunningProxy, SocketAddr) {
        spawn_binary(
            tag,
            &self.pki,
            &self.upstream.url(),
            &self.extra,
            Some(&self.a),
            reload_check_interval,
            args,
        )
    }
}

/// Waits for the INFO line saying that `how` ("SIGHUP", "file change") reloaded the client
/// certificate, which names its file.
fn wait_reloaded(proxy: &RunningProxy, how: &str) {
    let needle = format!("{how}: reloaded upstream[0].client_cert_file");
    let loaded = proxy.wait_json_messages("INFO", &[needle.as_str()], 1);
    assert!(loaded[0].contains("client.pem"), "{loaded:?}");
}

#[tokio::test]
async fn a_reload_gives_new_connections_the_new_certificate_and_a_bad_pair_keeps_the_old() {
    let r = rotation(&rcgen::PKCS_ECDSA_P256_SHA256).await;
    let (dir, running) = start_with_client(
        "mtls-reload",
        &r.pki,
        &r.upstream.url(),
        &r.extra,
        &r.a.cert_pem,
        &r.a.key_pem,
    )
    .await;
    let addr = running.proxy.local_addr();
    assert_presents(addr, &r.upstream, &r.a, String::new).await;

    // The config the proxy was started from shares its certificates with this one.
    install(&dir, &r.b.cert_pem, &r.b.key_pem);
    let report = running.config.reload_client_certs();
    assert_eq!(report.len(), 1);
    let loaded = report[0].as_ref().expect("reloaded");
    assert!(
        loaded.contains("upstream[0].client_cert_file/upstream[0].client_key_file"),
        "{loaded}"
    );
    assert_presents(addr, &r.upstream, &r.b, String::new).await;

    // A half-rotated pair (A's certificate, B's key): refused, B stays.
    write(&dir.join("client.pem"), &r.a.cert_pem);
    let report = running.config.reload_client_certs();
    let failed = report[0].as_ref().expect_err("refused");
    assert!(
        failed.contains("upstream[0].client_key_file")
            && failed.contains("does not match the certificate")
            && failed.contains("keeping the current client certificate"),
        "{failed}"
    );
    assert_presents(addr, &r.upstream, &r.b, String::new).await;
}

/// `pool_max_lifetime`: a pooled connection kept busy (never idle) goes on presenting the
/// certificate it was made with until its lifetime is up; then a new connection presents the
/// reloaded one. (tests/proxy_pool_lifetime.rs has the pool's side.)
#[tokio::test]
async fn a_busy_pooled_connection_presents_a_reloaded_certificate_after_its_lifetime() {
    let r = rotation(&rcgen::PKCS_ECDSA_P256_SHA256).await;
    let extra = format!("{CLIENT_FILES}\npool_max_lifetime = \"400ms\"");
    let (dir, running) = start_with_client(
        "mtls-lifetime",
        &r.pki,
        &r.upstream.url(),
        &extra,
        &r.a.cert_pem,
        &r.a.key_pem,
    )
    .await;
    let addr = running.proxy.local_addr();
    assert_presents(addr, &r.upstream, &r.a, String::new).await;
    install(&dir, &r.b.cert_pem, &r.b.key_pem);
    assert!(running.config.reload_client_certs()[0].is_ok());
    // Pooled: the next request still goes over A's connection.
    assert_presents(addr, &r.upstream, &r.a, String::new).await;
    let start = std::time::Instant::now();
    while r.upstream.last().peer.as_deref() != Some(r.b.der.as_ref()) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(3),
            "still presenting the old certificate"
        );
        assert_eq!(get_api(addr).await.status, StatusCode::OK);
    }
    assert!(start.elapsed() < std::time::Duration::from_millis(1500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_client_certificate_of_the_running_binary() {
    let r = rotation(&rcgen::PKCS_ED25519).await;
    let (dir, mut proxy, addr) = r.spawn("mtls-sighup", None, &["--workers", "2"]);
    // Both event loops' connections present A, then B after the signal.
    for _ in 0..4 {
        assert_presents(addr, &r.upstream, &r.a, || proxy.log()).await;
    }
    install(&dir, &r.b.cert_pem, &r.b.key_pem);
    proxy.signal("HUP");
    wait_reloaded(&proxy, "SIGHUP");
    for _ in 0..4 {
        assert_presents(addr, &r.upstream, &r.b, || proxy.log()).await;
    }
    // A key that is not PEM: one error line, B stays.
    write(&dir.join("client.key"), "not a key\n");
    proxy.signal("HUP");
    let failed = proxy.wait_json_messages("ERROR", &["upstream[0].client_key_file"], 1);
    assert!(
        failed[0].contains("not a PEM private key file"),
        "{failed:?}"
    );
    assert_presents(addr, &r.upstream, &r.b, String::new).await;
    assert!(proxy.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_client_certificate_is_presented_without_a_signal() {
    let r = rotation(&rcgen::PKCS_ECDSA_P256_SHA256).await;
    let (dir, mut proxy, addr) = r.spawn("mtls-watch", Some("1s"), &[]);
    assert_presents(addr, &r.upstream, &r.a, || proxy.log()).await;
    install(&dir, &r.b.cert_pem, &r.b.key_pem);
    wait_reloaded(&proxy, "file change");
    assert_presents(addr, &r.upstream, &r.b, String::new).await;
    assert!(proxy.stop().success());
}

// ---------------------------------------------------------------------------------------------
// Config errors
// ---------------------------------------------------------------------------------------------

fn parse_error(auth: &str, url: &str, extra: &str) -> (String, String) {
    let pki = new_pki();
    let dir = config_dir("mtls-parse", &pki, "127.0.0.1:0", auth, url, extra);
    let err = ProxyConfig::load(&dir.join("proxy.toml")).unwrap_err();
    assert_eq!(err.file(), dir.join("proxy.toml"));
    (err.key().to_owned(), err.problem().to_owned())
}

#[test]
fn both_or_neither_and_only_over_https() {
    let https = "https://127.0.0.1:1";
    let (key, problem) = parse_error(USERS, https, "client_cert_file = \"c.pem\"");
    assert_eq!(key, "upstream[0].client_key_file");
    assert!(problem.contains("set both or neither"), "{problem}");
    let (key, problem) = parse_error(USERS, https, "client_key_file = \"c.key\"");
    assert_eq!(key, "upstream[0].client_cert_file");
    assert!(problem.contains("set both or neither"), "{problem}");
    let (key, problem) = parse_error(USERS, "http://127.0.0.1:1", CLIENT_FILES);
    assert_eq!(key, "upstream[0].client_cert_file");
    assert!(
        problem.contains("only used with an https:// url"),
        "{problem}"
    );

    let verify = "verify_client_cert_file = \"c.pem\"\nverify_client_key_file = \"c.key\"";
    let (key, problem) = parse_error(&format!("{USERS}\n{verify}"), https, "");
    assert_eq!(key, "auth.verify_client_cert_file");
    assert!(
        problem.contains("only used with auth.verify_url"),
        "{problem}"
    );
    let (key, problem) = parse_error(
        &format!("verify_url = \"http://127.0.0.1:1/v\"\n{verify}"),
        https,
        "",
    );
    assert_eq!(key, "auth.verify_client_cert_file");
    assert!(problem.contains("https:// auth.verify_url"), "{problem}");
    let (key, problem) = parse_error(
        "verify_url = \"https://127.0.0.1:1/v\"\nverify_client_key_file = \"c.key\"",
        https,
        "",
    );
    assert_eq!(key, "auth.verify_client_cert_file");
    assert!(problem.contains("set both or neither"), "{problem}");
    // A typo is an unknown key, never silently ignored.
    let (key, _) = parse_error(USERS, https, "client_cert = \"c.pem\"");
    assert!(key.contains("client_cert"), "{key}");

    // Both, over https: paths resolve beside the config.
    let pki = new_pki();
    let dir = config_dir(
        "mtls-parse-ok",
        &pki,
        "127.0.0.1:0",
        USERS,
        https,
        CLIENT_FILES,
    );
    let config = ProxyConfig::load(&dir.join("proxy.toml")).unwrap();
    let files = config.upstreams[0].client_cert.as_ref().unwrap();
    assert_eq!(files.cert, dir.join("client.pem"));
    assert_eq!(files.key, dir.join("client.key"));
}

/// `check_files` (what `check-config` runs), `ProxySettings::from_config` (what `run` does
/// first) and the binary's `check-config` all refuse `dir`'s files with `key` and `needle`.
fn assert_file_error(dir: &Path, key: &str, needle: &str) {
    let config = ProxyConfig::load(&dir.join("proxy.toml")).expect("the file itself is fine");
    let err = config.check_files().unwrap_err();
    assert_eq!(err.key(), key, "{err}");
    assert!(err.problem().contains(needle), "{err}");
    assert_eq!(err.file(), dir.join("proxy.toml"));
    let run = ProxySettings::from_config(&config).unwrap_err();
    assert!(run.contains(key) && run.contains(needle), "{run}");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(dir.join("proxy.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("proxy.toml") && stderr.contains(key) && stderr.contains(needle),
        "{stderr}"
    );
}

#[test]
fn bad_files_are_errors_naming_the_file_the_key_and_the_problem() {
    let pki = new_pki();
    let a = client_leaf(&pki.client_ca, "a", &rcgen::PKCS_ECDSA_P256_SHA256);
    let b = client_leaf(&pki.client_ca, "b", &rcgen::PKCS_ECDSA_P256_SHA256);
    let https = "https://127.0.0.1:1";
    let dir = config_dir(
        "mtls-files",
        &pki,
        "127.0.0.1:0",
        USERS,
        https,
        CLIENT_FILES,
    );
    let (cert_key, key_key) = (
        "upstream[0].client_cert_file",
        "upstream[0].client_key_file",
    );

    // Missing.
    assert_file_error(&dir, cert_key, "client.pem: cannot read");
    // Unreadable (a folder).
    std::fs::create_dir_all(dir.join("client.pem")).unwrap();
    assert_file_error(&dir, cert_key, "client.pem: cannot read");
    std::fs::remove_dir(dir.join("client.pem")).unwrap();
    // Not PEM.
    install(&dir, "hello\n", &a.key_pem);
    assert_file_error(&dir, cert_key, "not a PEM certificate file");
    install(&dir, &a.cert_pem, "hello\n");
    assert_file_error(&dir, key_key, "not a PEM private key file");
    // The key in the certificate's place: no certificate in it.
    install(&dir, &a.key_pem, &a.key_pem);
    assert_file_error(&dir, cert_key, "not a PEM certificate file");
    // The key of another certificate.
    install(&dir, &a.cert_pem, &b.key_pem);
    assert_file_error(&dir, key_key, "does not match the certificate in");
    // Expired: refused (every handshake would fail), with the date.
    let old_key = KeyPair::generate().unwrap();
    let expired = issue_with(&pki.client_ca, "old", old_key, true, Some((2020, 2021)));
    install(&dir, &expired.cert_pem, &expired.key_pem);
    assert_file_error(&dir, cert_key, "expired at 2021-01-01 00:00:00 UTC");
    // Not valid yet (a clock behind, or a certificate issued for later): refused too.
    let future = issue_with(
        &pki.client_ca,
        "later",
        KeyPair::generate().unwrap(),
        true,
        Some((2090, 2091)),
    );
    install(&dir, &future.cert_pem, &future.key_pem);
    assert_file_error(&dir, cert_key, "not valid before 2090-01-01 00:00:00 UTC");
    // An encrypted key.
    let encrypted = openssl(
        &[
            "pkcs8",
            "-topk8",
            "-v2",
            "aes-256-cbc",
            "-passout",
            "pass:secret",
        ],
        &a.key_pem,
    );
    assert!(encrypted.contains("ENCRYPTED PRIVATE KEY"));
    install(&dir, &a.cert_pem, &encrypted);
    assert_file_error(&dir, key_key, "encrypted");

    // And verify_url's, under its own keys.
    let auth = "verify_url = \"https://127.0.0.1:1/v\"\nverify_client_cert_file = \"client.pem\"\n\
                verify_client_key_file = \"client.key\"";
    let dir = config_dir("mtls-files-verify", &pki, "127.0.0.1:0", auth, https, "");
    install(&dir, &a.cert_pem, &b.key_pem);
    let config = ProxyConfig::load(&dir.join("proxy.toml")).unwrap();
    let err = config.check_files().unwrap_err();
    assert_eq!(err.key(), "auth.verify_client_key_file", "{err}");
    assert!(err.problem().contains("does not match"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The key stays secret
// ---------------------------------------------------------------------------------------------

/// Forms in which the key could leak: its PEM base64 lines, and the hex of its DER.
fn key_forms(key_pem: &str) -> Vec<String> {
    let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let hex: String = der
        .secret_der()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut forms: Vec<String> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .map(|l| l[..16].to_owned())
        .collect();
    forms.push(hex[hex.len() - 32..].to_owned());
    forms.push(
        format!("{:?}", &der.secret_der()[der.secret_der().len() - 8..])
            .trim_matches(['[', ']'])
            .to_owned(),
    );
    forms
}

#[tokio::test]
async fn the_key_never_shows_in_debug_or_errors() {
    let pki = new_pki();
    let upstream = start_mtls_upstream(&pki.server, &pki.client_ca).await;
    let a = client_leaf(&pki.client_ca, "a", &rcgen::PKCS_ECDSA_P256_SHA256);
    let b = client_leaf(&pki.client_ca, "b", &rcgen::PKCS_ECDSA_P256_SHA256);
    let (dir, running) = start_presenting("mtls-secret", &pki, &upstream, &a).await;
    assert_eq!(
        get_api(running.proxy.local_addr()).await.status,
        StatusCode::OK
    );
    let settings = ProxySettings::from_config(&running.config).unwrap();
    let shown = format!(
        "{:?}\n{:?}\n{:?}\n{:#?}",
        running.config,
        settings,
        running.config.upstreams[0]
            .client_cert
            .as_ref()
            .unwrap()
            .load(&dir)
            .unwrap(),
        running.proxy.state()
    );
    assert!(shown.contains("client.key"), "the paths are shown");
    // Errors: a mismatched key, and a key file whose PEM is damaged.
    install(&dir, &b.cert_pem, &a.key_pem);
    let mismatch = running.config.reload_client_certs();
    let damaged = a.key_pem.replace("-----END PRIVATE KEY-----", "");
    install(&dir, &a.cert_pem, &damaged);
    let config = ProxyConfig::load(&dir.join("proxy.toml")).unwrap();
    let not_pem = config.check_files().unwrap_err().to_string();
    let texts = format!("{shown}\n{mismatch:?}\n{not_pem}");
    for form in key_forms(&a.key_pem) {
        assert!(!texts.contains(&form), "the key shows ({form}): {texts}");
    }
}

//! A `countersign run` for the `server.trusted_proxies` tests (tests/proxy_trusted_proxies.rs
//! and its adversarial pass, tests/proxy_trusted_proxies_qa.rs): the `[server]` lines given,
//! `max_failures_per_ip = 3`, a real upstream behind the `VerifyLayer`, five users. Include
//! after `mod support;`, `mod support_run;` and `mod support_users;`.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::*;
use crate::support_run::*;
use crate::support_users::*;

pub struct TrustedProxy {
    pub proxy: RunningProxy,
    pub addr: SocketAddr,
    pub upstream: Upstream,
    pub users: Users,
    pub config: PathBuf,
    /// The admin listener (plain HTTP, never behind the balancer).
    pub admin: SocketAddr,
}

/// A proxy whose `[server]` has the `server` lines (`listen` rewritten by `listen` if given,
/// `{port}` replaced by the port chosen), with `max_failures_per_ip = 3` (and a per-user limit
/// far above what the tests reach), its upstream behind the `VerifyLayer`.
pub async fn start(tag: &str, server: &str, listen: Option<&str>) -> TrustedProxy {
    let upstream = start_upstream(
        both_keys_keyring(),
        std::sync::Arc::new(countersign::clock::SystemClock),
    )
    .await;
    let users = Users::five();
    let dir = temp_dir(tag);
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users.text());
    let base = dir.to_path_buf();
    let (proxy, addr, admin) = start_on_free_ports(|local, admin| {
        let listen = match listen {
            Some(l) => l.replace("{port}", &local.port().to_string()),
            None => local.to_string(),
        };
        let text = config_text(&listen, Some(&admin.to_string()), &upstream.url()).replace(
            "shutdown_grace = \"2s\"\n",
            &format!("shutdown_grace = \"2s\"\n{server}"),
        ) + "\n[auth.throttle]\nmax_failures_per_ip = 3\nmax_failures_per_user = 100\n";
        let config = base.join("proxy.toml");
        write(&config, &text);
        RunningProxy::spawn(&config, &["--workers", "2"])
    });
    let config = dir.join("proxy.toml");
    TrustedProxy {
        proxy: proxy.keep_dir(dir),
        addr,
        admin,
        upstream,
        users,
        config,
    }
}

/// Raw bytes over one connection made from `from` (a loopback address: any of 127/8 is
/// this host's), read until the server closes or 5 s pass.
pub async fn raw_from(from: IpAddr, addr: SocketAddr, request: &[u8]) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET /api/who` as raw HTTP/1.1 with `session`'s cookie and the `extra` header lines (raw
/// bytes, each ending in CRLF); `close` ends the connection after it.
pub fn who(session: &Login, extra: &[u8], close: bool) -> Vec<u8> {
    let mut r = format!(
        "GET /api/who HTTP/1.1\r\nHost: app.test\r\nCookie: {}\r\n",
        session.cookie
    )
    .into_bytes();
    r.extend_from_slice(extra);
    if close {
        r.extend_from_slice(b"Connection: close\r\n");
    }
    r.extend_from_slice(b"\r\n");
    r
}

/// The `X-Forwarded-For` values of the upstream's requests from index `from` on.
pub fn seen_since(upstream: &Upstream, from: usize) -> Vec<Vec<String>> {
    upstream.raw.lock()[from..]
        .iter()
        .map(|seen| {
            seen.headers
                .get_all("x-forwarded-for")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect()
        })
        .collect()
}

/// `127.0.0.<last>`.
pub fn lo(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

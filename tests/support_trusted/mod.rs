//! A `countersign run` for the `server.trusted_proxies` tests (tests/proxy_trusted_proxies.rs
//! and its adversarial pass, tests/proxy_trusted_proxies_qa.rs): the `[server]` lines given,
//! `max_failures_per_ip = 3`, a real upstream behind the `VerifyLayer`, five users. Include
//! after `mod support;`, `mod support_run;` and `mod support_users;`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::support::*;
use crate::support_run::*;
use crate::support_users::*;

pub struct TrustedProxy {
    pub proxy: RunningProxy,
    pub addr: SocketAddr,
    pub upstream: Upstream,
    pub users: Users,
    pub config: PathBuf,
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
    let (proxy, addr, _) = start_on_free_ports(|local, _| {
        let listen = match listen {
            Some(l) => l.replace("{port}", &local.port().to_string()),
            None => local.to_string(),
        };
        let text = config_text(&listen, None, &upstream.url()).replace(
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
        upstream,
        users,
        config,
    }
}

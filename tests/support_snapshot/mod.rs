//! `countersign run` with `session.snapshot_file`, as the snapshot tests start it: a config
//! directory with `keys.toml` (key `k1`), `users.toml` and a `state/` folder, one proxy config
//! per listening port, all naming the same snapshot file. Include after `mod support;`,
//! `mod support_run;` and `mod support_users;`.
#![allow(dead_code)]
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use countersign::clock::SystemClock;

use crate::support::{both_keys_keyring, keyring_file_text, start_upstream, write, Upstream};
use crate::support_run::{config_text, start_on_free_ports, two_free_addrs, RunningProxy};
use crate::support_users::Users;

/// The `public_origin` of [`started_snapshot_proxy`] and [`waiting_snapshot_proxy`].
pub const SNAPSHOT_ORIGIN: &str = "http://app.test";
/// Their `session.snapshot_file`, relative to their folder.
pub const SNAPSHOT_FILE: &str = "state/sessions.snapshot";

/// The API behind the proxies: a real upstream behind the `VerifyLayer`.
pub async fn snapshot_upstream() -> Upstream {
    start_upstream(both_keys_keyring(), Arc::new(SystemClock)).await
}

/// A proxy on `dir`'s [`SNAPSHOT_FILE`] that is serving (panics with its log otherwise).
pub fn started_snapshot_proxy(
    dir: &Path,
    upstream: &Upstream,
    users: &Users,
    extra: &str,
) -> (RunningProxy, SocketAddr) {
    let (proxy, addr, _) = start_snapshot_proxy(dir, upstream, users, extra, false);
    (proxy, addr)
}

/// [`started_snapshot_proxy`] with an admin listener too (for `/metrics`): the proxy, its
/// address and its admin address.
pub fn started_snapshot_proxy_with_admin(
    dir: &Path,
    upstream: &Upstream,
    users: &Users,
    extra: &str,
) -> (RunningProxy, SocketAddr, SocketAddr) {
    start_snapshot_proxy(dir, upstream, users, extra, true)
}

/// A serving proxy on free ports ([`start_on_free_ports`]: started again on other ports when
/// another test took one between its choice and the proxy's bind), with an admin listener
/// when `with_admin`.
fn start_snapshot_proxy(
    dir: &Path,
    upstream: &Upstream,
    users: &Users,
    extra: &str,
    with_admin: bool,
) -> (RunningProxy, SocketAddr, SocketAddr) {
    let (mut proxy, addr, admin) = start_on_free_ports(|addr, admin| {
        spawn_snapshot_proxy_on(
            dir,
            upstream,
            users,
            (SNAPSHOT_ORIGIN, SNAPSHOT_FILE, extra),
            addr,
            with_admin.then_some(admin),
        )
    });
    proxy.wait_listening(addr);
    (proxy, addr, admin)
}

/// A proxy on `dir`'s [`SNAPSHOT_FILE`] that has said it waits for the lock, naming the lock
/// file and the key, and does not listen.
pub fn waiting_snapshot_proxy(
    dir: &Path,
    upstream: &Upstream,
    users: &Users,
    extra: &str,
) -> (RunningProxy, SocketAddr) {
    let (proxy, addr) =
        spawn_snapshot_proxy(dir, upstream, users, SNAPSHOT_ORIGIN, SNAPSHOT_FILE, extra);
    let warned = proxy.wait_json_messages("WARN", &["holds its lock"], 1);
    assert!(
        warned[0].contains("sessions.snapshot.lock")
            && warned[0].contains("session.snapshot_lock_wait"),
        "{warned:?}"
    );
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "it listens while waiting: {}",
        proxy.log()
    );
    (proxy, addr)
}

/// Spawns `countersign run --workers 2` on `dir` with `server.public_origin = origin`,
/// `session.snapshot_file = snapshot` (relative to `dir`) and the `extra_session` lines in
/// `[session]`, on a free port. Does not wait for it: see [`wait_started`].
pub fn spawn_snapshot_proxy(
    dir: &Path,
    upstream: &Upstream,
    users: &Users,
    origin: &str,
    snapshot: &str,
    extra_session: &str,
) -> (RunningProxy, SocketAddr) {
    let (addr, _) = two_free_addrs();
    let proxy = spawn_snapshot_proxy_on(
        dir,
        upstream,
        users,
        (origin, snapshot, extra_session),
        addr,
        None,
    );
    (proxy, addr)
}

/// [`spawn_snapshot_proxy`] on `addr`, with an admin listener at `admin` when given;
/// `(origin, snapshot, extra_session)` as there.
fn spawn_snapshot_proxy_on(
    dir: &Path,
    upstream: &Upstream,
    users: &Users,
    (origin, snapshot, extra_session): (&str, &str, &str),
    addr: SocketAddr,
    admin: Option<SocketAddr>,
) -> RunningProxy {
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users.text());
    std::fs::create_dir_all(dir.join("state")).unwrap();
    let config = dir.join(format!("proxy-{}.toml", addr.port()));
    let admin = admin.map(|a| a.to_string());
    let text = config_text(&addr.to_string(), admin.as_deref(), &upstream.url())
        .replace(
            "store = \"memory\"\n",
            &format!("store = \"memory\"\nsnapshot_file = \"{snapshot}\"\n{extra_session}"),
        )
        .replace("\"http://app.test\"", &format!("{origin:?}"));
    write(&config, &text);
    RunningProxy::spawn(&config, &["--workers", "2"])
}

/// Waits at most `limit` for "proxy listening", then until `addr` accepts; false if the
/// proxy exited first or does not listen by then.
pub fn wait_started(proxy: &mut RunningProxy, addr: SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while !proxy.log().contains("proxy listening") {
        if proxy.child.try_wait().unwrap().is_some() || Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.wait_listening(addr);
    true
}

//! The live keys of `proxy.toml` beyond the response headers and the login throttle: the
//! `[session]` lifetimes, each `[[upstream]]`'s `timeout`, `max_body` and `body_idle_timeout`,
//! and `static_dir`'s `max_static_file`, `static_cache_size` and `static_immutable`. A reload
//! (SIGHUP, or a file change with `server.reload_check_interval`) of a valid file applies
//! them on every event loop, names them in an info line and what waits for a restart in a
//! warning; an invalid file applies nothing and its error names the file and the key.
//! Against the real binary with `--workers 2` and a real hyper upstream on loopback.
//!
//! Run: `cargo test --all-features --test proxy_reload_live_keys`.
#![cfg(feature = "proxy")]

mod support;
mod support_redis;
mod support_run;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use support_redis::RedisServer;
use support_run::*;

/// Fresh connections per look: `SO_REUSEPORT` spreads them over the two event loops by their
/// ports, so with this many each loop answers some (a loop left with the old setting is
/// missed with odds of 2^-8 per look; every look in a test repeats it).
const TRIES: usize = 8;

/// A plain hyper upstream (no signature check: the limits are the proxy's): `/api/slow`
/// answers after 1 s, `/api/stream` sends its head, then a piece after 1.2 s; anything else
/// answers at once with the length of the body it read.
struct SlowUpstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SlowUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type UpBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

async fn answer(req: Request<Incoming>) -> Result<Response<UpBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let len = body.map_or(0, |b| b.len());
    if path == "/api/slow" {
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    if path == "/api/stream" {
        let late = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            Ok::<_, Infallible>(http_body::Frame::data(Bytes::from("late")))
        });
        let body = http_body_util::StreamBody::new(late);
        return Ok(Response::new(body.boxed_unsync()));
    }
    Ok(Response::new(
        Full::new(Bytes::from(format!("read {len}"))).boxed_unsync(),
    ))
}

async fn start_slow_upstream() -> SlowUpstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(answer))
                    .await;
            });
        }
    });
    SlowUpstream { addr, task }
}

/// The settings a test varies, written into `proxy.toml`.
#[derive(Clone)]
struct Settings {
    /// Extra `[server]` lines.
    server: String,
    /// Extra `[session]` lines.
    session: String,
    /// The upstream's name.
    name: String,
    /// Extra `[[upstream]]` lines.
    upstream: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            server: String::new(),
            session: String::new(),
            name: "api".into(),
            upstream: String::new(),
        }
    }
}

fn config(listen: SocketAddr, admin: SocketAddr, upstream: SocketAddr, s: &Settings) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
public_origin = "http://app.test"
shutdown_grace = "2s"
{server}
[admin]
listen = "{admin}"

[session]
{store}{session}
[auth]
users_file = "users.toml"

[signing]
keyring = "keys.toml"

[[upstream]]
name = "{name}"
prefix = "/api/"
url = "http://{upstream}"
auth = "none"
{extra}
"#,
        server = s.server,
        // The memory store unless the test names one.
        store = if s.session.contains("store =") {
            ""
        } else {
            "store = \"memory\"\n"
        },
        session = s.session,
        name = s.name,
        extra = s.upstream,
    )
}

struct Running {
    proxy: RunningProxy,
    addr: SocketAddr,
    admin: SocketAddr,
    dir: PathBuf,
    upstream: SlowUpstream,
}

impl Running {
    /// Rewrites `proxy.toml` at once (a new file renamed over it).
    fn rewrite(&self, settings: &Settings) {
        let staged = self.dir.join(".proxy.toml.new");
        write(
            &staged,
            &config(self.addr, self.admin, self.upstream.addr, settings),
        );
        std::fs::rename(&staged, self.dir.join("proxy.toml")).unwrap();
    }

    /// Rewrites `proxy.toml` with `settings` and sends SIGHUP.
    fn reload(&self, settings: &Settings) {
        self.rewrite(settings);
        self.proxy.signal("HUP");
    }
}

async fn start(dir: &Path, settings: &Settings) -> Running {
    let upstream = start_slow_upstream().await;
    write(&dir.join("keys.toml"), &keyring_file_text("k1"));
    write(&dir.join("users.toml"), &users_file_text());
    let (mut proxy, addr, admin) = start_on_free_ports(|addr, admin| {
        let file = dir.join("proxy.toml");
        write(&file, &config(addr, admin, upstream.addr, settings));
        RunningProxy::spawn(&file, &["--workers", "2"])
    });
    proxy.wait_listening(addr);
    Running {
        proxy,
        addr,
        admin,
        dir: dir.to_path_buf(),
        upstream,
    }
}

/// The statuses of [`TRIES`] answers to `GET path`, each on a fresh connection.
async fn statuses(addr: SocketAddr, path: &str) -> Vec<(StatusCode, String)> {
    let mut seen = Vec::with_capacity(TRIES);
    for _ in 0..TRIES {
        let reply = send(addr, Method::GET, path, &[], "").await;
        let code = if reply.status.is_success() {
            String::new()
        } else {
            reply.error_code()
        };
        seen.push((reply.status, code));
    }
    seen
}

fn all(status: StatusCode, code: &str) -> Vec<(StatusCode, String)> {
    vec![(status, code.to_owned()); TRIES]
}

/// [`TRIES`] POSTs of `len` bytes to `/api/echo`, each on a fresh connection.
async fn posts(addr: SocketAddr, len: usize) -> Vec<(StatusCode, String)> {
    let mut seen = Vec::with_capacity(TRIES);
    for _ in 0..TRIES {
        let reply = send(
            addr,
            Method::POST,
            "/api/echo",
            &[
                ("origin", ORIGIN),
                ("content-type", "application/octet-stream"),
            ],
            vec![b'x'; len],
        )
        .await;
        let code = if reply.status.is_success() {
            reply.text()
        } else {
            reply.error_code()
        };
        seen.push((reply.status, code));
    }
    seen
}

/// `GET /auth/session?touch=false` with `login`'s cookie: the status (and the session's
/// `expires_at` when it is live).
async fn session_state(addr: SocketAddr, login: &Login) -> (StatusCode, Option<u64>) {
    let reply = send(
        addr,
        Method::GET,
        "/auth/session?touch=false",
        &[("cookie", &login.cookie)],
        "",
    )
    .await;
    let expires =
        (reply.status == StatusCode::OK).then(|| reply.json()["expires_at"].as_u64().unwrap());
    (reply.status, expires)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The `Max-Age` of a login's `Set-Cookie`, and the session.
async fn login_with_max_age(addr: SocketAddr) -> (Login, u64) {
    let reply = login_alice_reply_at(addr).await;
    let set_cookie = reply.set_cookie().unwrap();
    let max_age = set_cookie
        .split(';')
        .find_map(|part| part.trim().strip_prefix("Max-Age="))
        .unwrap()
        .parse()
        .unwrap();
    (reply.login(), max_age)
}

/// Lowering `session.idle_timeout` ends a session already issued by the new rule (idle for
/// longer than the new limit), and a session made after the reload gets the new lifetimes:
/// its `expires_at`, the cookie's `Max-Age` (the new `absolute_timeout`), and its idle end.
/// On the code before these keys were live, the first session stayed (the warning named
/// `session.idle_timeout` as waiting for a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowered_session_lifetimes_apply_to_existing_and_new_sessions() {
    let dir = temp_dir("reload-live-keys-session");
    let start_settings = Settings {
        session: "idle_timeout = \"30m\"\nabsolute_timeout = \"12h\"\n".into(),
        ..Settings::default()
    };
    let run = start(&dir, &start_settings).await;
    let (old, max_age) = login_with_max_age(run.addr).await;
    assert_eq!(max_age, 12 * 3600);
    assert_eq!(session_state(run.addr, &old).await.0, StatusCode::OK);
    // Idle for more than the coming limit (whole seconds: 3 s is past a 2 s idle end).
    tokio::time::sleep(Duration::from_millis(3100)).await;

    let lowered = Settings {
        session: "idle_timeout = \"2s\"\nabsolute_timeout = \"1h\"\n".into(),
        ..Settings::default()
    };
    run.reload(&lowered);
    let applied = run
        .proxy
        .wait_json_messages("INFO", &["SIGHUP:", "applied"], 1);
    assert!(
        applied[0]
            .contains("proxy.toml: applied 2 keys: session.absolute_timeout, session.idle_timeout"),
        "{applied:?}"
    );
    assert!(
        run.proxy.json_messages("WARN", &["proxy.toml"]).is_empty(),
        "{}",
        run.proxy.log()
    );
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 0);
    // The session from before the reload has been idle longer than the new limit.
    assert_eq!(
        session_state(run.addr, &old).await.0,
        StatusCode::UNAUTHORIZED
    );

    // A new session: the new lifetimes, on whichever event loop answers.
    let (new, max_age) = login_with_max_age(run.addr).await;
    assert_eq!(
        max_age, 3600,
        "the cookie's Max-Age is the new absolute_timeout"
    );
    let (status, expires) = session_state(run.addr, &new).await;
    assert_eq!(status, StatusCode::OK);
    let expires = expires.unwrap();
    let now = now_unix();
    assert!(
        expires <= now + 2 && expires + 2 >= now,
        "expires_at {expires} is not about 2 s from now ({now})"
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    assert_eq!(
        session_state(run.addr, &new).await.0,
        StatusCode::UNAUTHORIZED
    );
    let mut proxy = run.proxy;
    assert!(proxy.stop().success());
}

/// With `store = "redis"` (a real redis-server started by the test) a lowered
/// `session.idle_timeout` ends a session already in Redis by the new rule too (its record holds
/// its login and last use), and a new session gets the new lifetime. On the code before these
/// keys were live, the first session stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_a_lowered_idle_timeout_ends_existing_sessions() {
    let redis = RedisServer::start();
    let dir = temp_dir("reload-live-keys-session-redis");
    let store = format!("store = \"redis\"\nredis_url = \"{}\"\n", redis.url());
    let run = start(
        &dir,
        &Settings {
            session: store.clone(),
            ..Settings::default()
        },
    )
    .await;
    let old = login_alice_at(run.addr).await;
    assert_eq!(session_state(run.addr, &old).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(3100)).await;

    run.reload(&Settings {
        session: format!("{store}idle_timeout = \"2s\"\n"),
        ..Settings::default()
    });
    run.proxy.wait_json_messages(
        "INFO",
        &["SIGHUP:", "proxy.toml: applied 1 key: session.idle_timeout"],
        1,
    );
    assert_eq!(
        session_state(run.addr, &old).await.0,
        StatusCode::UNAUTHORIZED
    );
    let new = login_alice_at(run.addr).await;
    let (status, expires) = session_state(run.addr, &new).await;
    assert_eq!(status, StatusCode::OK);
    let (expires, now) = (expires.unwrap(), now_unix());
    assert!(
        expires <= now + 2 && expires + 2 >= now,
        "expires_at {expires} is not about 2 s from now ({now})"
    );
    let mut proxy = run.proxy;
    assert!(proxy.stop().success());
}

/// Lowering an upstream's `timeout` by SIGHUP: a slow upstream (1 s) that passed answers 504
/// `gateway_timeout` on both event loops; raised back, it passes again. On the code before
/// these keys were live, the slow request kept passing after the reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_timeout_lowered_and_raised_by_sighup() {
    let dir = temp_dir("reload-live-keys-timeout");
    let slow_ok = Settings {
        upstream: "timeout = \"5s\"\n".into(),
        ..Settings::default()
    };
    let run = start(&dir, &slow_ok).await;
    assert_eq!(
        statuses(run.addr, "/api/slow").await,
        all(StatusCode::OK, "")
    );

    run.reload(&Settings {
        upstream: "timeout = \"300ms\"\n".into(),
        ..Settings::default()
    });
    run.proxy.wait_json_messages(
        "INFO",
        &["SIGHUP:", "proxy.toml: applied 1 key: upstream[0].timeout"],
        1,
    );
    assert_eq!(
        statuses(run.addr, "/api/slow").await,
        all(StatusCode::GATEWAY_TIMEOUT, "gateway_timeout")
    );
    // A quick answer still passes.
    assert_eq!(
        statuses(run.addr, "/api/quick").await,
        all(StatusCode::OK, "")
    );

    run.reload(&slow_ok);
    run.proxy.wait_json_messages(
        "INFO",
        &["SIGHUP:", "proxy.toml: applied 1 key: upstream[0].timeout"],
        2,
    );
    assert_eq!(
        statuses(run.addr, "/api/slow").await,
        all(StatusCode::OK, "")
    );
    assert!(
        run.proxy.json_messages("WARN", &["proxy.toml"]).is_empty(),
        "{}",
        run.proxy.log()
    );
    let mut proxy = run.proxy;
    assert!(proxy.stop().success());
}

/// Lowering `max_body` by SIGHUP: a body that passed answers 413 `body_too_large`. Then a
/// file with an invalid value (`timeout = "soon"`) next to a raised `max_body` applies
/// nothing: the error names the file and the key, and the lowered limit still holds. On the
/// code before these keys were live, the 2 KiB body kept passing after the first reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_body_limit_holds_and_an_invalid_edit_changes_nothing() {
    let dir = temp_dir("reload-live-keys-body");
    let run = start(&dir, &Settings::default()).await;
    assert_eq!(
        posts(run.addr, 2048).await,
        all(StatusCode::OK, "read 2048")
    );

    run.reload(&Settings {
        upstream: "max_body = \"1KiB\"\n".into(),
        ..Settings::default()
    });
    run.proxy.wait_json_messages(
        "INFO",
        &["SIGHUP:", "proxy.toml: applied 1 key: upstream[0].max_body"],
        1,
    );
    assert_eq!(
        posts(run.addr, 2048).await,
        all(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );
    assert_eq!(posts(run.addr, 512).await, all(StatusCode::OK, "read 512"));

    // Invalid: nothing of it applies, not even the valid `max_body`.
    run.reload(&Settings {
        upstream: "max_body = \"64KiB\"\ntimeout = \"soon\"\n".into(),
        ..Settings::default()
    });
    let errors = run.proxy.wait_json_messages(
        "ERROR",
        &["SIGHUP:", "proxy.toml", "upstream[0].timeout"],
        1,
    );
    assert!(errors[0].contains("soon"), "{errors:?}");
    assert!(
        errors[0].contains("applies none of the file's"),
        "{errors:?}"
    );
    assert_eq!(gauge(run.admin, "countersign_config_file_invalid").await, 1);
    assert_eq!(
        posts(run.addr, 2048).await,
        all(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
    );
    assert_eq!(
        run.proxy
            .json_messages("INFO", &["SIGHUP:", "applied"])
            .len(),
        1,
        "{}",
        run.proxy.log()
    );
    let mut proxy = run.proxy;
    assert!(proxy.stop().success());
}

/// A mixed edit: the live part applies (the lowered `timeout`), the restart-only keys
/// (`session.cookie_name`, `pool_max_idle_per_host`) are named in the warning as waiting and
/// not applied (the old cookie still works). Then an upstream renamed in the same edit as its
/// `timeout` changed: the entry may be another upstream now, so its timeout waits with the
/// name. On the code before these keys were live, the slow request kept passing after the
/// first reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_only_keys_wait_and_the_live_part_applies() {
    let dir = temp_dir("reload-live-keys-mixed");
    let run = start(&dir, &Settings::default()).await;
    let login = login_alice_at(run.addr).await;
    assert_eq!(session_state(run.addr, &login).await.0, StatusCode::OK);

    let mixed = Settings {
        session: "cookie_name = \"other_session\"\n".into(),
        upstream: "timeout = \"300ms\"\npool_max_idle_per_host = 4\n".into(),
        ..Settings::default()
    };
    run.reload(&mixed);
    let applied = run.proxy.wait_json_messages(
        "INFO",
        &["SIGHUP:", "proxy.toml: applied 1 key: upstream[0].timeout"],
        1,
    );
    assert!(!applied[0].contains("cookie_name"), "{applied:?}");
    let waiting = run
        .proxy
        .wait_json_messages("WARN", &["SIGHUP:", "proxy.toml changed"], 1);
    assert!(
        waiting[0].contains("2 keys: session.cookie_name, upstream[0].pool_max_idle_per_host"),
        "{waiting:?}"
    );
    assert_eq!(gauge(run.admin, "countersign_config_file_changed").await, 1);
    assert_eq!(
        statuses(run.addr, "/api/slow").await,
        all(StatusCode::GATEWAY_TIMEOUT, "gateway_timeout")
    );
    // The cookie name is the one running: the old session still works.
    assert_eq!(session_state(run.addr, &login).await.0, StatusCode::OK);

    // Renamed with its timeout raised: the timeout waits with the name.
    run.reload(&Settings {
        name: "renamed".into(),
        upstream: "timeout = \"5s\"\npool_max_idle_per_host = 4\n".into(),
        ..mixed.clone()
    });
    let waiting = run
        .proxy
        .wait_json_messages("WARN", &["SIGHUP:", "proxy.toml changed"], 2);
    assert!(
        waiting[1].contains("upstream[0].name") && waiting[1].contains("upstream[0].timeout"),
        "{waiting:?}"
    );
    assert_eq!(
        statuses(run.addr, "/api/slow").await,
        all(StatusCode::GATEWAY_TIMEOUT, "gateway_timeout")
    );
    let mut proxy = run.proxy;
    assert!(proxy.stop().success());
}

/// `body_idle_timeout` lowered by SIGHUP: a stream whose upstream pauses 1.2 s is cut for
/// the requests after the reload (the client sees the body break), where it passed before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_body_idle_timeout_cuts_a_quiet_answer() {
    let dir = temp_dir("reload-live-keys-body-idle");
    let run = start(&dir, &Settings::default()).await;
    for _ in 0..TRIES {
        let reply = send(run.addr, Method::GET, "/api/stream", &[], "").await;
        assert_eq!(reply.text(), "late");
    }
    run.reload(&Settings {
        upstream: "body_idle_timeout = \"300ms\"\n".into(),
        ..Settings::default()
    });
    run.proxy.wait_json_messages(
        "INFO",
        &[
            "SIGHUP:",
            "proxy.toml: applied 1 key: upstream[0].body_idle_timeout",
        ],
        1,
    );
    for _ in 0..TRIES {
        let response = send_streaming(run.addr, Method::GET, "/api/stream", &[], "").await;
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.into_body().collect().await;
        assert!(body.is_err(), "the quiet answer was not cut: {body:?}");
    }
    let mut proxy = run.proxy;
    assert!(proxy.stop().success());
}

/// `static_dir`'s limits apply live, here through the file-change check
/// (`server.reload_check_interval`, no signal): a lowered `max_static_file` refuses a file it
/// served (500 `internal_error`), and `static_immutable` marks a folder immutable. On the code
/// before these keys were live, the file kept being served and the warning named the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_limits_apply_on_a_file_change() {
    let dir = temp_dir("reload-live-keys-static");
    let site = dir.join("site");
    std::fs::create_dir_all(site.join("assets")).unwrap();
    write(&site.join("index.html"), "<!doctype html>");
    write(&site.join("assets/app.js"), &"x".repeat(4096));
    let server = |extra: &str| Settings {
        server: format!("static_dir = \"site\"\nreload_check_interval = \"1s\"\n{extra}"),
        ..Settings::default()
    };
    let run = start(&dir, &server("")).await;
    let first = send(run.addr, Method::GET, "/assets/app.js", &[], "").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["cache-control"], "no-cache");

    run.rewrite(&server(
        "max_static_file = \"1KiB\"\nstatic_immutable = [\"/assets/\"]\nstatic_cache_size = \"1MiB\"\n",
    ));
    let applied =
        run.proxy
            .wait_json_messages("INFO", &["file change:", "proxy.toml: applied 3 keys"], 1);
    assert!(
        applied[0]
            .contains("server.max_static_file, server.static_cache_size, server.static_immutable"),
        "{applied:?}"
    );
    assert_eq!(
        statuses(run.addr, "/assets/app.js").await,
        all(StatusCode::INTERNAL_SERVER_ERROR, "internal_error")
    );
    run.rewrite(&server(
        "static_immutable = [\"/assets/\"]\nstatic_cache_size = \"1MiB\"\n",
    ));
    run.proxy.wait_json_messages(
        "INFO",
        &[
            "file change:",
            "proxy.toml: applied 1 key: server.max_static_file",
        ],
        1,
    );
    for _ in 0..TRIES {
        let reply = send(run.addr, Method::GET, "/assets/app.js", &[], "").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(
            reply.headers["cache-control"],
            "public, max-age=31536000, immutable"
        );
    }
    assert!(
        run.proxy.json_messages("WARN", &["proxy.toml"]).is_empty(),
        "{}",
        run.proxy.log()
    );
    let mut proxy = run.proxy;
    assert!(proxy.stop().success());
}

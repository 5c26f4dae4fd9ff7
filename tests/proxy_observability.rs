//! What an operator's tools ingest from a running `countersign run`: `/metrics` as Prometheus
//! scrapers parse it (the official Python client's parser and `promtool check metrics`, both
//! independent of this code, installed by `interop/observability-tools.sh`), log lines as log
//! pipelines split and parse them (JSON and human format, with hostile request values and an
//! upstream name with quotes, a backslash and a line break), the access line's fields, and
//! `/healthz` / `/readyz` as probes see them, with a real `redis-server` going down and up.
//! Real processes on loopback. Run: `cargo test --all-features --test proxy_observability`.
#![cfg(feature = "proxy")]

mod support;
mod support_metrics;
mod support_redis;
mod support_run;

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rand::Rng as _;
use support::*;
use support_metrics::{check_with_independent_parsers, checker_python};
use support_redis::RedisServer;
use support_run::*;

/// An operator-chosen upstream name with everything the text format must escape in a label
/// value (`"`, `\`, a line feed), as `proxy.toml` writes it and as it is meant.
const WEIRD_NAME_TOML: &str = r#""we\"ird\\name\nx""#;
const WEIRD_NAME: &str = "we\"ird\\name\nx";

// ---------------------------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------------------------

/// An upstream that answers `/api/status/NNN` with status NNN (any code HTTP can carry,
/// 100-999), `/api/broken` with a 200 whose body breaks after its first bytes (hyper then
/// closes the connection mid-body), and everything else with 200, empty bodies. It does not
/// verify: what is observed here is the proxy, not the signature.
async fn status_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    if req.uri().path() == "/api/broken" {
                        return Ok::<_, Infallible>(Response::new(http_body_util::Either::Left(
                            BreaksAfterFirstFrame(None),
                        )));
                    }
                    let status = req
                        .uri()
                        .path()
                        .strip_prefix("/api/status/")
                        .and_then(|code| code.parse::<u16>().ok())
                        .and_then(|code| StatusCode::from_u16(code).ok())
                        .unwrap_or(StatusCode::OK);
                    let mut response =
                        Response::new(http_body_util::Either::Right(Full::new(Bytes::new())));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

/// A response body: one frame, then (100 ms later, so that hyper has sent the head and that
/// frame) an error, on which hyper closes the connection mid-body.
struct BreaksAfterFirstFrame(Option<std::pin::Pin<Box<tokio::time::Sleep>>>);

impl http_body::Body for BreaksAfterFirstFrame {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, std::io::Error>>> {
        use std::future::Future as _;
        match &mut self.0 {
            None => {
                self.0 = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                    b"partial",
                )))))
            }
            Some(pause) => pause
                .as_mut()
                .poll(cx)
                .map(|()| Some(Err(std::io::Error::other("the upstream broke mid-body")))),
        }
    }
}

/// `proxy.toml` with an admin listener, the given `[session]` lines, the upstream `api` at
/// `api` and the upstream [`WEIRD_NAME`] (prefix `/weird/`) at `weird`.
fn config_text(
    listen: SocketAddr,
    admin: SocketAddr,
    session: &str,
    api: &str,
    weird: &str,
) -> String {
    format!(
        r#"
[server]
listen = "{listen}"
public_origin = "{ORIGIN}"
shutdown_grace = "2s"

[admin]
listen = "{admin}"

[session]
{session}

[auth]
users_file = "users.toml"

[signing]
keyring = "keys.toml"

[[upstream]]
name = "api"
prefix = "/api/"
url = "{api}"

[[upstream]]
name = {WEIRD_NAME_TOML}
prefix = "/weird/"
url = "{weird}"
"#
    )
}

struct Proxy {
    process: RunningProxy,
    addr: SocketAddr,
    admin: SocketAddr,
    /// Its config directory, removed after the process is killed (fields drop in order).
    _dir: TestDir,
}

/// Starts `countersign run` with [`config_text`] and `--log-format log_format`.
fn start_proxy(tag: &str, log_format: &str, session: &str, api: &str, weird: &str) -> Proxy {
    let dir = temp_dir(tag);
    std::fs::write(dir.join("keys.toml"), keyring_file_text("k1")).unwrap();
    std::fs::write(dir.join("users.toml"), users_file_text()).unwrap();
    let (mut process, addr, admin) = start_on_free_ports(|listen, admin| {
        let config = dir.join("proxy.toml");
        std::fs::write(&config, config_text(listen, admin, session, api, weird)).unwrap();
        RunningProxy::spawn_logging(&config, log_format, &[])
    });
    process.wait_listening(addr);
    process.wait_listening(admin);
    Proxy {
        process,
        addr,
        admin,
        _dir: dir,
    }
}

async fn admin_get(admin: SocketAddr, path: &str) -> Reply {
    send(admin, Method::GET, path, &[], Bytes::new()).await
}

/// One scrape of `/metrics`, checked for its status and content type.
async fn scrape(admin: SocketAddr) -> String {
    let reply = admin_get(admin, "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    reply.text()
}

/// The series (sample lines) of a scrape.
fn series(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

/// The request id the client got back.
fn request_id(reply: &Reply) -> String {
    reply.headers["x-request-id"].to_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------------
// The independent checkers
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------------------------

/// After traffic that moves every family (logins ok, failed and throttled; upstream answers
/// 2xx, 4xx, 5xx and a 999; the proxy's own refusals of each kind; the session store up and
/// then down), every scrape is valid text exposition format to two independent parsers,
/// follows the naming conventions, escapes the operator's route name, keeps histograms
/// cumulative, and counts every request it timed. Then a storm of random paths and methods
/// adds no series: nothing a client sends becomes a label value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_every_kind_of_traffic_parse_as_prometheus_text() {
    // Installed first: the proxy's lifetime should not include a first-run install.
    checker_python();
    let mut redis = RedisServer::start();
    let (api, _api_task) = status_upstream().await;
    let (_refusing, dead) = refusing_addr();
    let proxy = start_proxy(
        "metrics",
        "json",
        &format!("store = \"redis\"\nredis_url = \"{}\"", redis.url()),
        &format!("http://{api}"),
        &format!("http://{dead}"),
    );
    let (addr, admin) = (proxy.addr, proxy.admin);

    // Logins: ok, failed, throttled (the 6th failure of one name in the window).
    let alice = login_alice_at(addr).await;
    assert_eq!(
        login_at(addr, "alice", "wrong").await.status,
        StatusCode::UNAUTHORIZED
    );
    for _ in 0..5 {
        assert_eq!(
            login_at(addr, "mallory", "wrong").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        login_at(addr, "mallory", "wrong").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Upstream answers, passed through.
    for code in [200u16, 204, 404, 500, 503, 999] {
        let reply = get(addr, &format!("/api/status/{code}"), &alice).await;
        assert_eq!(reply.status.as_u16(), code, "{}", reply.text());
    }
    // The proxy's own answers.
    let none = Login {
        cookie: String::new(),
        csrf: String::new(),
    };
    let own: Vec<(Reply, StatusCode)> = vec![
        (get(addr, "/weird/x", &alice).await, StatusCode::BAD_GATEWAY),
        (get(addr, "/api/x", &none).await, StatusCode::UNAUTHORIZED),
        (
            send(
                addr,
                Method::POST,
                "/api/x",
                &[("cookie", &alice.cookie)],
                "{}",
            )
            .await,
            StatusCode::FORBIDDEN,
        ),
        (
            send(
                addr,
                Method::POST,
                "/auth/login",
                &[("content-type", "text/plain")],
                "x",
            )
            .await,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            send(addr, Method::GET, "/auth/login", &[], Bytes::new()).await,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            send(
                addr,
                Method::POST,
                "/auth/login",
                &[("content-type", "application/json"), ("origin", ORIGIN)],
                "{not json",
            )
            .await,
            StatusCode::BAD_REQUEST,
        ),
        (
            get(addr, "/api/%2e%2e/x", &alice).await,
            StatusCode::BAD_REQUEST,
        ),
        (
            get(addr, "/nothing/here", &none).await,
            StatusCode::NOT_FOUND,
        ),
        (
            send(
                addr,
                Method::GET,
                "/api/ws",
                &[("connection", "upgrade"), ("upgrade", "websocket")],
                Bytes::new(),
            )
            .await,
            StatusCode::NOT_IMPLEMENTED,
        ),
        (get(addr, "/auth/session", &alice).await, StatusCode::OK),
    ];
    for (reply, expected) in &own {
        assert_eq!(reply.status, *expected, "{}", reply.text());
    }
    // An answer whose upstream breaks after the head: the client sees the body fail.
    let broken = send_streaming(
        addr,
        Method::GET,
        "/api/broken",
        &[("cookie", &alice.cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(broken.status(), StatusCode::OK);
    assert!(http_body_util::BodyExt::collect(broken.into_body())
        .await
        .is_err());
    let up = scrape(admin).await;
    assert!(up.contains("\ncountersign_session_store_up 1\n"), "{up}");
    assert!(up.contains("\ncountersign_active_sessions 1\n"), "{up}");
    assert!(
        up.contains("countersign_requests_total{route=\"upstream/api\",status=\"999\"} 1\n"),
        "a status the upstream sent is missing from countersign_requests_total:\n{up}"
    );
    assert!(
        up.contains(
            "countersign_requests_total{route=\"upstream/we\\\"ird\\\\name\\nx\",status=\"502\"} 1\n"
        ),
        "{up}"
    );
    // Latency by route: the six upstream answers are timed under their route, apart from the
    // logins (argon2) and the proxy's own refusals.
    for wanted in [
        "countersign_request_duration_seconds_count{route=\"upstream/api\"} ",
        "countersign_request_duration_seconds_bucket{route=\"auth/login\",le=\"+Inf\"} ",
        "countersign_request_duration_seconds_sum{route=\"unmatched\"} ",
        "countersign_request_duration_seconds_count{route=\"upstream/we\\\"ird\\\\name\\nx\"} 1\n",
    ] {
        assert!(up.contains(wanted), "{wanted} missing in\n{up}");
    }
    assert!(
        !up.contains("countersign_request_duration_seconds_count{route=\"static\"}"),
        "a route that answered nothing has latency series:\n{up}"
    );
    // Each upstream's reachability, the refusing one 0, its name escaped as a label value.
    assert!(
        up.contains("\ncountersign_upstream_up{upstream=\"api\"} 1\n"),
        "{up}"
    );
    assert!(
        up.contains("\ncountersign_upstream_up{upstream=\"we\\\"ird\\\\name\\nx\"} 0\n"),
        "{up}"
    );
    // Answers cut after their head: a series per upstream and kind from the first scrape, the
    // operator's name escaped; the broken answer counted under its upstream; the refusing
    // upstream's 502 is a failure before any head, counted in countersign_upstream_errors_total
    // only.
    for wanted in [
        "\ncountersign_upstream_body_errors_total{upstream=\"api\",kind=\"idle_timeout\"} 0\n",
        "\ncountersign_upstream_body_errors_total{upstream=\"api\",kind=\"broken\"} 1\n",
        "\ncountersign_upstream_body_errors_total{upstream=\"we\\\"ird\\\\name\\nx\",kind=\"idle_timeout\"} 0\n",
        "\ncountersign_upstream_body_errors_total{upstream=\"we\\\"ird\\\\name\\nx\",kind=\"broken\"} 0\n",
        "\ncountersign_upstream_errors_total 1\n",
    ] {
        assert!(up.contains(wanted), "{wanted} missing in\n{up}");
    }

    // A storm of made-up paths and methods, with and without a session: no new series.
    let before: HashSet<String> = series(&up)
        .iter()
        .filter(|l| l.starts_with("countersign_requests_total"))
        .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
        .collect();
    let mut tokens = Vec::new();
    for i in 0..120 {
        let token: String = {
            let mut rng = rand::thread_rng();
            (0..12)
                .map(|_| char::from(rng.gen_range(b'a'..=b'z')))
                .collect()
        };
        let method = Method::from_bytes(format!("X{}", token.to_uppercase()).as_bytes()).unwrap();
        let (path, headers): (String, Vec<(&str, &str)>) = match i % 3 {
            0 => (format!("/{token}"), vec![]),
            1 => (format!("/api/{token}"), vec![("cookie", &alice.cookie)]),
            _ => (format!("/auth/{token}"), vec![]),
        };
        let reply = send(addr, method, &path, &headers, Bytes::new()).await;
        assert!(reply.status.is_client_error(), "{path}: {}", reply.status);
        tokens.push(token);
    }
    let stormed = scrape(admin).await;
    let after: HashSet<String> = series(&stormed)
        .iter()
        .filter(|l| l.starts_with("countersign_requests_total"))
        .map(|l| l.rsplit_once(' ').unwrap().0.to_owned())
        .collect();
    let new: Vec<_> = after.difference(&before).collect();
    assert!(
        new.len() <= 2,
        "random paths and methods made series: {new:?}"
    );
    let lowered = stormed.to_lowercase();
    assert!(
        !tokens.iter().any(|t| lowered.contains(t.as_str())),
        "request input in a label:\n{stormed}"
    );

    // The store down: up-gauge 0, no session count, and a request that needs it is a 503.
    redis.stop();
    let refused = get(addr, "/api/status/200", &alice).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    let down = scrape(admin).await;
    assert!(
        down.contains("\ncountersign_session_store_up 0\n"),
        "{down}"
    );
    assert!(!down.contains("\ncountersign_active_sessions "), "{down}");

    check_with_independent_parsers(
        &[("up", &up), ("stormed", &stormed), ("down", &down)],
        &[
            "auth/login",
            "auth/session",
            "unmatched",
            "upstream/api",
            &format!("upstream/{WEIRD_NAME}"),
        ],
        // Per route that answered (5 here, at most 7 with logout and static): its statuses,
        // 16 latency series (14 buckets, _sum, _count); plus the other families.
        160,
    );
}

// ---------------------------------------------------------------------------------------------
// Logs
// ---------------------------------------------------------------------------------------------

/// A JSON object that must not name a key twice (serde_json keeps the last one silently; a
/// collector may keep the first).
struct StrictObject(serde_json::Map<String, serde_json::Value>);

impl<'de> serde::Deserialize<'de> for StrictObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StrictObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StrictObject, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some((key, value)) = map.next_entry::<String, serde_json::Value>()? {
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("key {key:?} twice")));
                    }
                    out.insert(key, value);
                }
                Ok(StrictObject(out))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// What one request should leave in its access line.
struct Expected {
    id: String,
    route: String,
    status: u16,
    user: String,
    reason: Option<&'static str>,
}

/// Requests whose user names, paths, methods and headers hold quotes, backslashes, line breaks,
/// control and bidi characters and invalid UTF-8, plus an error on the upstream whose name has
/// a line break. Returns what each access line must say.
async fn hostile_traffic(addr: SocketAddr) -> Vec<Expected> {
    let mut expected = Vec::new();
    let mut expect = |reply: &Reply, route: &str, user: &str, reason: Option<&'static str>| {
        expected.push(Expected {
            id: request_id(reply),
            route: route.to_owned(),
            status: reply.status.as_u16(),
            user: user.to_owned(),
            reason,
        })
    };
    let forged = "2030-01-01T00:00:00.000000Z  INFO countersign::access: request_id=\"x\"";
    for name in [
        format!("evil\n{forged}"),
        "q\"u\\o\rte\u{0}\u{7}\u{1b}[31m\u{7f}\u{85}\u{2028}\u{2029}\u{202e}end".to_owned(),
        "{\"level\":\"ERROR\"}".to_owned(),
    ] {
        let reply = login_at(addr, &name, "wrong").await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
        // No user has that name: not logged (it could be a password typed into the name
        // field; proxy_observability_qa.rs).
        expect(&reply, "auth/login", "-", Some("invalid_credentials"));
    }
    // Invalid UTF-8 in the login body: refused before a user is known.
    let reply = send(
        addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json"), ("origin", ORIGIN)],
        &b"{\"username\":\"a\xff\xfe\nb\",\"password\":\"x\"}"[..],
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    expect(&reply, "auth/login", "-", Some("bad_request"));

    let alice = login_alice_at(addr).await;
    // Paths with encoded line breaks and quotes, obs-text header bytes, an extension method.
    let reply = send(
        addr,
        Method::GET,
        "/api/a%0a%0d%22b?q=%0a%22x",
        &[("cookie", &alice.cookie), ("x-note", "v\"\\")],
        Bytes::new(),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    expect(&reply, "upstream/api", "alice", None);
    let mut raw_header = http::HeaderMap::new();
    raw_header.insert(
        "x-request-id",
        http::HeaderValue::from_bytes(b"id\xff\"x").unwrap(),
    );
    let reply = {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut request = Request::builder()
            .method(Method::from_bytes(b"X-Y!#$%&'*+.^_`|~").unwrap())
            .uri("/nothing/%0a%22")
            .header("host", addr.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        request.headers_mut().extend(raw_header);
        let response = sender.send_request(request).await.unwrap();
        Reply {
            status: response.status(),
            headers: response.headers().clone(),
            body: Bytes::new(),
        }
    };
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_ne!(request_id(&reply), "id\u{ff}\"x");
    expect(&reply, "unmatched", "-", Some("not_found"));
    // A well-formed id from the client is kept, returned and logged.
    let reply = send(
        addr,
        Method::GET,
        "/api/status/204",
        &[("cookie", &alice.cookie), ("x-request-id", "trace-4.2_a")],
        Bytes::new(),
    )
    .await;
    assert_eq!(request_id(&reply), "trace-4.2_a");
    expect(&reply, "upstream/api", "alice", None);
    // The proxy's own refusals carry their reason.
    let reply = send(
        addr,
        Method::POST,
        "/api/x",
        &[("cookie", &alice.cookie)],
        "{}",
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    expect(&reply, "upstream/api", "alice", Some("csrf"));
    let reply = get(
        addr,
        "/api/x",
        &Login {
            cookie: String::new(),
            csrf: String::new(),
        },
    )
    .await;
    expect(&reply, "upstream/api", "-", Some("unauthenticated"));
    let reply = get(addr, "/weird/x", &alice).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    expect(
        &reply,
        &format!("upstream/{WEIRD_NAME}"),
        "alice",
        Some("bad_gateway"),
    );
    expected
}

/// Sends [`hostile_traffic`] through a proxy logging in `log_format` (memory sessions, the
/// `api` upstream a [`status_upstream`], the weird-named one refusing connections), stops it,
/// and returns what each access line must say and the whole log.
async fn log_of_hostile_traffic(tag: &str, log_format: &str) -> (Vec<Expected>, String) {
    let (api, _api_task) = status_upstream().await;
    let (_refusing, dead) = refusing_addr();
    let mut proxy = start_proxy(
        tag,
        log_format,
        "store = \"memory\"",
        &format!("http://{api}"),
        &format!("http://{dead}"),
    );
    let expected = hostile_traffic(proxy.addr).await;
    proxy.process.stop();
    (expected, proxy.process.log())
}

/// Every line of the JSON log is one strict JSON object (no key twice) whatever the requests
/// held, and each request has exactly one access line naming the request id the client got
/// back in `X-Request-Id`, its route, status, latency, user, and, when the proxy refused it,
/// the reason code its answer carried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_parse_and_access_lines_carry_what_an_operator_needs() {
    let (expected, log) = log_of_hostile_traffic("json-log", "json").await;
    let mut access = Vec::new();
    for line in log.lines() {
        let object = serde_json::Value::Object(
            serde_json::from_str::<StrictObject>(line)
                .unwrap_or_else(|e| panic!("not one strict JSON object ({e}): {line:?}"))
                .0,
        );
        for key in ["timestamp", "level", "target"] {
            assert!(object[key].is_string(), "no {key}: {line}");
        }
        if object["target"] == "countersign::access" {
            access.push(object);
        }
    }
    for want in &expected {
        let lines: Vec<_> = access
            .iter()
            .filter(|a| a["request_id"] == want.id.as_str())
            .collect();
        assert_eq!(lines.len(), 1, "access lines for {}: {log}", want.id);
        let line = lines[0];
        assert_eq!(line["route"], want.route.as_str(), "{line:?}");
        assert_eq!(line["status"], want.status, "{line:?}");
        assert_eq!(line["user"], want.user.as_str(), "{line:?}");
        assert!(line["latency_ms"].as_f64().is_some(), "{line:?}");
        assert!(line["method"].is_string(), "{line:?}");
        match want.reason {
            Some(reason) => assert_eq!(line["reason"], reason, "{line:?}"),
            None => assert!(line.get("reason").is_none(), "{line:?}"),
        }
    }
}

/// In the human format every line starts with a timestamp and a level: nothing a request
/// carries, nor an operator's upstream name with a line break in an error line, starts a line
/// of its own, and no control character (terminal escapes, carriage returns) nor Unicode line
/// separator reaches the terminal or the file raw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn human_log_lines_cannot_be_split_or_forged() {
    let (expected, log) = log_of_hostile_traffic("human-log", "human").await;
    for line in log.lines() {
        let (timestamp, rest) = line.split_once(' ').unwrap_or_default();
        let is_timestamp = timestamp.len() >= 20
            && timestamp.ends_with('Z')
            && timestamp.as_bytes()[..4].iter().all(u8::is_ascii_digit)
            && timestamp.as_bytes()[4] == b'-';
        let level = rest.trim_start().split(' ').next().unwrap_or_default();
        assert!(
            is_timestamp && ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
            "a line that does not start with a timestamp and a level: {line:?}\n{log}"
        );
        assert!(
            !line
                .chars()
                .any(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')),
            "a raw control character or line separator: {line:?}"
        );
        assert!(!line.starts_with("2030-01-01"), "a forged line: {line:?}");
    }
    // Each request's access line is there, with its id, status and reason.
    for want in &expected {
        let line = log
            .lines()
            .find(|l| {
                l.contains(&format!("request_id=\"{}\"", want.id))
                    && l.contains("countersign::access")
            })
            .unwrap_or_else(|| panic!("no access line for {}: {log}", want.id));
        assert!(
            line.contains(&format!(" status={} ", want.status)),
            "{line}"
        );
        if let Some(reason) = want.reason {
            assert!(line.contains(&format!(" reason=\"{reason}\"")), "{line}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// /healthz and /readyz
// ---------------------------------------------------------------------------------------------

/// Redis's count of PING commands served (INFO commandstats).
fn redis_pings(redis: &RedisServer) -> u64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_ping:calls="))
        .map_or(0, |rest| {
            rest.split(',').next().unwrap_or("0").parse().unwrap_or(0)
        })
}

/// Polls `path` on the admin listener until it answers `status` (at most `limit`).
async fn wait_for_status(admin: SocketAddr, path: &str, status: StatusCode, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let reply = admin_get(admin, path).await;
        if reply.status == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still answers {} ({}), not {status}",
            reply.status,
            reply.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/readyz` says not ready while the session store is down and ready again once it is back,
/// as OPERATIONS.md documents; `/healthz` stays 200 throughout (a restart would not help).
/// Probes are cheap: an answer is reused for 2 s, so a burst of probes costs Redis one PING.
/// Neither endpoint nor `/metrics` is served on the public listener. An upstream that does not
/// accept connections also makes the proxy not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_session_store_and_the_upstreams() {
    let mut redis = RedisServer::start();
    let (api, _api_task) = status_upstream().await;
    let proxy = start_proxy(
        "readyz",
        "json",
        &format!("store = \"redis\"\nredis_url = \"{}\"", redis.url()),
        &format!("http://{api}"),
        &format!("http://{api}"),
    );
    let (addr, admin) = (proxy.addr, proxy.admin);
    let health = admin_get(admin, "/healthz").await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.json()["status"], "ok");
    wait_for_status(admin, "/readyz", StatusCode::OK, Duration::from_secs(10)).await;
    let head = send(admin, Method::HEAD, "/readyz", &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    for path in ["/healthz", "/readyz", "/metrics"] {
        let public = send(addr, Method::GET, path, &[], Bytes::new()).await;
        assert_eq!(
            public.status,
            StatusCode::NOT_FOUND,
            "{path} on the public listener"
        );
    }

    // A burst of probes within the 2 s the answer is reused: at most one more check.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let pings = redis_pings(&redis);
    let started = Instant::now();
    for _ in 0..20 {
        assert_eq!(admin_get(admin, "/readyz").await.status, StatusCode::OK);
    }
    let spent = started.elapsed();
    let burst = redis_pings(&redis) - pings;
    if spent < Duration::from_secs(2) {
        assert!(burst <= 1, "{burst} PINGs for 20 probes in {spent:?}");
    }

    redis.stop();
    wait_for_status(
        admin,
        "/readyz",
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(admin_get(admin, "/readyz").await.json()["ready"], false);
    assert_eq!(admin_get(admin, "/healthz").await.status, StatusCode::OK);
    assert!(scrape(admin)
        .await
        .contains("\ncountersign_session_store_up 0\n"));

    redis.restart();
    wait_for_status(admin, "/readyz", StatusCode::OK, Duration::from_secs(15)).await;
    assert!(scrape(admin)
        .await
        .contains("\ncountersign_session_store_up 1\n"));
    drop(proxy);

    // An upstream that refuses connections: not ready, with the store up.
    let (_refusing, dead) = refusing_addr();
    let proxy = start_proxy(
        "readyz-upstream",
        "json",
        "store = \"memory\"",
        &format!("http://{api}"),
        &format!("http://{dead}"),
    );
    let not_ready = admin_get(proxy.admin, "/readyz").await;
    assert_eq!(not_ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        admin_get(proxy.admin, "/healthz").await.status,
        StatusCode::OK
    );
    proxy
        .process
        .wait_for_log("readiness: upstream not reachable");
}

// ---------------------------------------------------------------------------------------------
// Dropped log lines
// ---------------------------------------------------------------------------------------------

/// With `server.log_queue_lines = 1` the log writer's queue is full whenever the writer thread
/// is busy, so a burst of requests loses access lines. `countersign_log_lines_dropped_total`
/// counts exactly the lost ones: the requests answered minus the access lines that reached
/// stderr (only access lines are enabled, so nothing else competes for the queue).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_log_lines_are_counted_exactly() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    const CONNECTIONS: usize = 8;
    const REQUESTS_PER_CONNECTION: usize = 1000;

    let (_refusing, dead) = refusing_addr();
    let dir = temp_dir("log-drops");
    std::fs::write(dir.join("keys.toml"), keyring_file_text("k1")).unwrap();
    std::fs::write(dir.join("users.toml"), users_file_text()).unwrap();
    // Not start_on_free_ports: it waits for the "listening" line, which this filter hides.
    let (addr, admin) = two_free_addrs();
    let config = dir.join("proxy.toml");
    let text = config_text(
        addr,
        admin,
        "store = \"memory\"",
        &format!("http://{dead}"),
        &format!("http://{dead}"),
    )
    .replace(
        "shutdown_grace = \"2s\"",
        "shutdown_grace = \"2s\"\nlog_queue_lines = 1",
    );
    std::fs::write(&config, text).unwrap();
    let mut process = RunningProxy::spawn_with_env(
        &config,
        "json",
        &[],
        &[("RUST_LOG", "countersign::access=info")],
    );
    process.wait_listening(addr);
    process.wait_listening(admin);
    let dropped = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("countersign_log_lines_dropped_total "))
            .unwrap_or_else(|| panic!("no countersign_log_lines_dropped_total in\n{text}"))
            .parse()
            .unwrap()
    };
    let first = scrape(admin).await;
    assert_eq!(dropped(&first), 0, "{}", process.log());
    // Without session.snapshot_file there is no lock to report (its gauge:
    // tests/proxy_session_snapshot_lock_kept.rs).
    assert!(
        !first.contains("countersign_session_snapshot_lock_held"),
        "{first}"
    );

    // Pipelined HTTP/1.1 requests (each a 404: no route, no static_dir), as fast as the proxy
    // answers them; the last one on each connection closes it.
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(tokio::spawn(async move {
            let mut batch = String::new();
            for i in 0..REQUESTS_PER_CONNECTION {
                let close = if i + 1 == REQUESTS_PER_CONNECTION {
                    "Connection: close\r\n"
                } else {
                    ""
                };
                batch.push_str(&format!(
                    "GET /nothing HTTP/1.1\r\nHost: app.test\r\n{close}\r\n"
                ));
            }
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut read, mut write) = stream.split();
            let mut answers = Vec::new();
            let (written, got) = tokio::join!(
                write.write_all(batch.as_bytes()),
                read.read_to_end(&mut answers)
            );
            written.unwrap();
            got.unwrap();
            String::from_utf8_lossy(&answers)
                .matches("HTTP/1.1 404 ")
                .count()
        }));
    }
    let mut answered = 0;
    for client in clients {
        answered += client.await.unwrap();
    }
    assert_eq!(answered, CONNECTIONS * REQUESTS_PER_CONNECTION);
    let counted = dropped(&scrape(admin).await);

    // Stopping flushes what is still queued; then every line that was not dropped is there.
    assert!(process.stop().success());
    let written = process
        .log()
        .lines()
        .filter(|l| l.contains("\"target\":\"countersign::access\""))
        .count();
    eprintln!(
        "{answered} requests in {:?}: {written} access lines written, {counted} dropped",
        started.elapsed()
    );
    assert!(counted > 0, "no line dropped ({written} written)");
    assert_eq!(
        counted,
        (answered - written) as u64,
        "{answered} requests, {written} access lines written, {counted} counted as dropped"
    );
}

/// `server.log_queue_lines` out of its range is refused by `check-config`, naming the key: 0
/// would drop every line the writer is not waiting for at that instant.
#[test]
fn log_queue_lines_out_of_range_is_refused() {
    let dir = temp_dir("log-queue-config");
    std::fs::write(dir.join("keys.toml"), keyring_file_text("k1")).unwrap();
    std::fs::write(dir.join("users.toml"), users_file_text()).unwrap();
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    for lines in ["0", "1048577", "\"many\""] {
        let text = config_text(
            addr,
            "127.0.0.1:10".parse().unwrap(),
            "store = \"memory\"",
            "http://127.0.0.1:9",
            "http://127.0.0.1:9",
        )
        .replace(
            "shutdown_grace = \"2s\"",
            &format!("shutdown_grace = \"2s\"\nlog_queue_lines = {lines}"),
        );
        let config = dir.join("proxy.toml");
        std::fs::write(&config, text).unwrap();
        let out = Command::new(BIN)
            .args(["check-config", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{lines}: {stderr}");
        assert!(
            stderr.contains("server.log_queue_lines"),
            "{lines}: {stderr}"
        );
    }
}

//! Upstream answers cut after their head, as an operator sees them from a running
//! `countersign run`: a quiet upstream cut by `body_idle_timeout` and an upstream whose
//! connection is reset mid-body each add exactly one to
//! `countersign_upstream_body_errors_total{upstream,kind}` under their own upstream and kind,
//! and write one WARN line naming the request (the `X-Request-Id` the client got back and the
//! upstream received), the upstream, the kind, how long the answer had streamed and the idle
//! limit; a flood of cuts is one line per 10 s whose `suppressed` counts the others (each of
//! those at DEBUG, with its request id); a normal streamed answer counts nothing. Real
//! processes on loopback: the proxy binary and a raw HTTP/1.1 upstream that answers the head and then goes quiet, resets, or ends cleanly.
//! Run: `cargo test --all-features --test proxy_stream_errors`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt as _;
use support::*;
use support_run::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// `body_idle_timeout` of both upstreams.
const IDLE: Duration = Duration::from_millis(500);
/// How long the resetting upstream streams (after its first chunk) before it resets.
const BEFORE_RESET: Duration = Duration::from_millis(200);

const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
                      transfer-encoding: chunked\r\n\r\n";
const EVENT: &[u8] = b"9\r\ndata: 1\n\n\r\n";

/// Every `X-Request-Id` the raw upstreams received (all tests).
static RECEIVED_IDS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn upstream_received(request_id: &str) -> bool {
    RECEIVED_IDS
        .lock()
        .unwrap()
        .iter()
        .any(|id| id == request_id)
}

/// A raw HTTP/1.1 upstream (keep-alive) answering by the path's last segment, each answer a
/// chunked event stream whose head and first event are sent at once:
/// - `ok`: two more events 100 ms apart, then the last chunk (a normal streamed answer);
/// - `quiet`: nothing more; holds the connection until the proxy closes it;
/// - `reset`: after [`BEFORE_RESET`], resets the connection (RST: `SO_LINGER` 0).
async fn raw_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_raw(stream));
        }
    });
    addr
}

async fn serve_raw(mut stream: TcpStream) {
    let mut buf = Vec::new();
    loop {
        // One request head (GETs: no body).
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        if let Some(id) = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-request-id")
                .then(|| value.trim().to_owned())
        }) {
            RECEIVED_IDS.lock().unwrap().push(id);
        }
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        if stream.write_all(HEAD).await.is_err() || stream.write_all(EVENT).await.is_err() {
            return;
        }
        match path.rsplit('/').next() {
            Some("quiet") => {
                // Until the proxy gives up on it.
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            Some("reset") => {
                tokio::time::sleep(BEFORE_RESET).await;
                let _ = stream.set_zero_linger();
                return; // dropped: RST
            }
            _ => {
                for _ in 0..2 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if stream.write_all(EVENT).await.is_err() {
                        return;
                    }
                }
                if stream.write_all(b"0\r\n\r\n").await.is_err() {
                    return;
                }
            }
        }
    }
}

/// `countersign run` (JSON log, admin listener, `env` added to its environment) with two
/// public upstreams at `upstream`, `events` (`/events/`) and `feeds` (`/feeds/`), both with
/// `body_idle_timeout` [`IDLE`].
fn start_proxy(
    tag: &str,
    upstream: SocketAddr,
    env: &[(&str, &str)],
) -> (RunningProxy, SocketAddr, SocketAddr) {
    let dir = temp_dir(tag);
    std::fs::write(dir.join("keys.toml"), keyring_file_text("k1")).unwrap();
    std::fs::write(dir.join("users.toml"), users_file_text()).unwrap();
    let idle = format!("{}ms", IDLE.as_millis());
    let (process, addr, admin) = start_on_free_ports(|listen, admin| {
        let config = dir.join("proxy.toml");
        let upstreams: String = ["events", "feeds"]
            .iter()
            .map(|name| {
                format!(
                    "[[upstream]]\nname = \"{name}\"\nprefix = \"/{name}/\"\n\
                     url = \"http://{upstream}\"\nauth = \"none\"\nbody_idle_timeout = \"{idle}\"\n"
                )
            })
            .collect();
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"{listen}\"\npublic_origin = \"{ORIGIN}\"\n\
                 shutdown_grace = \"2s\"\n[admin]\nlisten = \"{admin}\"\n\
                 [session]\nstore = \"memory\"\n[auth]\nusers_file = \"users.toml\"\n\
                 [signing]\nkeyring = \"keys.toml\"\n{upstreams}"
            ),
        )
        .unwrap();
        RunningProxy::spawn_with_env(&config, "json", &[], env)
    });
    let mut process = process.keep_dir(dir);
    process.wait_listening(addr);
    process.wait_listening(admin);
    (process, addr, admin)
}

/// The value of one series of a `/metrics` scrape (panics when it is missing).
async fn sample(admin: SocketAddr, series: &str) -> u64 {
    let text = send(admin, Method::GET, "/metrics", &[], Bytes::new())
        .await
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

fn body_errors(upstream: &str, kind: &str) -> String {
    format!("countersign_upstream_body_errors_total{{upstream=\"{upstream}\",kind=\"{kind}\"}}")
}

/// The four body-error counters: (events idle, events broken, feeds idle, feeds broken).
async fn counters(admin: SocketAddr) -> [u64; 4] {
    [
        sample(admin, &body_errors("events", "idle_timeout")).await,
        sample(admin, &body_errors("events", "broken")).await,
        sample(admin, &body_errors("feeds", "idle_timeout")).await,
        sample(admin, &body_errors("feeds", "broken")).await,
    ]
}

/// GETs `path` and reads its answer: `Ok(body)` when it ended cleanly, `Err` when it broke;
/// with the time from the head to the end.
async fn fetch(addr: SocketAddr, path: &str) -> (Result<Bytes, hyper::Error>, Duration) {
    let (body, took, _) = fetch_with(addr, path, &[]).await;
    (body, took)
}

/// [`fetch`] sending `headers`; also returns the answer's `X-Request-Id`.
async fn fetch_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (Result<Bytes, hyper::Error>, Duration, String) {
    let response = send_streaming(addr, Method::GET, path, headers, Bytes::new()).await;
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    let request_id = response
        .headers()
        .get("x-request-id")
        .unwrap_or_else(|| panic!("{path}: no X-Request-Id in the answer"))
        .to_str()
        .unwrap()
        .to_owned();
    let head_at = Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("{path}: the answer neither ended nor broke"));
    (body.map(|b| b.to_bytes()), head_at.elapsed(), request_id)
}

/// The access line (JSON object) of the request `request_id` (panics unless there is one).
fn access_line(proxy: &RunningProxy, request_id: &str) -> serde_json::Value {
    let log = proxy.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "countersign::access" && v["request_id"] == request_id)
        .collect();
    assert_eq!(lines.len(), 1, "one access line with {request_id}: {log}");
    lines.into_iter().next().unwrap()
}

/// The WARN lines about cut answers (JSON objects).
fn cut_lines(proxy: &RunningProxy) -> Vec<serde_json::Value> {
    proxy
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("upstream answer cut"))
        })
        .collect()
}

/// Waits (up to 5 s) for `count` cut lines; returns them.
async fn wait_cut_lines(proxy: &RunningProxy, count: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines = cut_lines(proxy);
        if lines.len() >= count || Instant::now() >= deadline {
            assert_eq!(lines.len(), count, "{}", proxy.log());
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// docs/OPERATIONS.md (Metrics, Logs, Streaming answers): normal streamed answers count
/// nothing; a quiet answer cut by `body_idle_timeout` counts one `idle_timeout` under its
/// upstream, a reset mid-body one `broken` under its own, each with one WARN line (request_id,
/// upstream, kind, streamed_ms, body_idle_timeout_ms, suppressed 0); the request_id is the
/// one the client got back in `X-Request-Id` and the access line has (made by the proxy, or
/// the client's own well-formed one); neither is a `countersign_upstream_errors_total`
/// (failures before the head).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_answers_are_counted_per_upstream_and_kind_and_logged() {
    let upstream = raw_upstream().await;
    let (proxy, addr, admin) = start_proxy("stream-errors", upstream, &[]);
    assert_eq!(counters(admin).await, [0; 4]);

    // Normal streamed answers, on both upstreams, twice (the second on a pooled connection).
    for path in ["/events/ok", "/feeds/ok", "/events/ok", "/feeds/ok"] {
        let (body, _) = fetch(addr, path).await;
        assert_eq!(body.expect(path), "data: 1\n\n".repeat(3));
    }
    assert_eq!(counters(admin).await, [0; 4]);

    // A quiet answer on `events` (the proxy makes its id).
    let (body, took, quiet_id) = fetch_with(addr, "/events/quiet", &[]).await;
    assert!(body.is_err(), "the client must see the answer break");
    assert!(
        // Not at the route's timeout (30 s) or never; the margin is for a loaded machine.
        took >= IDLE - Duration::from_millis(50) && took < IDLE * 10,
        "{took:?}"
    );
    assert_eq!(counters(admin).await, [1, 0, 0, 0]);
    let lines = wait_cut_lines(&proxy, 1).await;
    let quiet = &lines[0];
    assert_eq!(quiet["request_id"], quiet_id.as_str(), "{quiet}");
    assert!(upstream_received(&quiet_id));
    assert_eq!(access_line(&proxy, &quiet_id)["route"], "upstream/events");
    assert_eq!(quiet["upstream"], "events", "{quiet}");
    assert_eq!(quiet["kind"], "idle_timeout", "{quiet}");
    assert_eq!(quiet["body_idle_timeout_ms"], 500, "{quiet}");
    assert_eq!(quiet["suppressed"], 0, "{quiet}");
    let streamed = quiet["streamed_ms"].as_u64().expect("streamed_ms");
    assert!((450..4000).contains(&streamed), "{quiet}");
    assert!(
        quiet["error"]
            .as_str()
            .is_some_and(|e| e.contains("body_idle_timeout")),
        "{quiet}"
    );

    // A reset mid-body on `feeds`, under the client's own (well-formed) id, which the proxy
    // keeps.
    const CLIENT_ID: &str = "trace-7f3a.cut_reset";
    let (body, _, broken_id) =
        fetch_with(addr, "/feeds/reset", &[("x-request-id", CLIENT_ID)]).await;
    assert_eq!(broken_id, CLIENT_ID);
    assert!(body.is_err(), "the client must see the answer break");
    assert_eq!(counters(admin).await, [1, 0, 0, 1]);
    let lines = wait_cut_lines(&proxy, 2).await;
    let broken = &lines[1];
    assert_eq!(broken["request_id"], CLIENT_ID, "{broken}");
    assert!(upstream_received(CLIENT_ID));
    assert_eq!(access_line(&proxy, CLIENT_ID)["route"], "upstream/feeds");
    assert_eq!(broken["upstream"], "feeds", "{broken}");
    assert_eq!(broken["kind"], "broken", "{broken}");
    assert_eq!(broken["body_idle_timeout_ms"], 500, "{broken}");
    assert_eq!(broken["suppressed"], 0, "{broken}");
    let streamed = broken["streamed_ms"].as_u64().expect("streamed_ms");
    assert!(
        (150..IDLE.as_millis() as u64).contains(&streamed),
        "{broken}"
    );
    assert!(
        broken["error"]
            .as_str()
            .is_some_and(|e| e.to_lowercase().contains("reset")),
        "{broken}"
    );
    // Failures before the head are another family; none here.
    assert_eq!(sample(admin, "countersign_upstream_errors_total").await, 0);
    // And a normal answer after the cuts still counts nothing.
    let (body, _) = fetch(addr, "/feeds/ok").await;
    assert!(body.is_ok());
    assert_eq!(counters(admin).await, [1, 0, 0, 1]);
}

/// docs/OPERATIONS.md (Logs): an upstream cutting answers over and over is counted exactly,
/// every cut, but logged once per 10 s per upstream and kind; the next line, 10 s on, carries
/// in `suppressed` the cuts not logged. Another upstream's cut is not silenced by the flood.
/// Every cut names its request: the WARN line and the DEBUG lines of the others together
/// carry each id the clients got back, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_cuts_is_counted_exactly_and_logged_paced() {
    const FLOOD: u64 = 30;
    let upstream = raw_upstream().await;
    let (proxy, addr, admin) = start_proxy(
        "stream-errors-flood",
        upstream,
        &[("RUST_LOG", "info,countersign::proxy::upstream_pool=debug")],
    );
    let flood: Vec<_> = (0..FLOOD)
        .map(|_| tokio::spawn(fetch_with(addr, "/feeds/reset", &[])))
        .collect();
    let mut sent_ids = Vec::new();
    for task in flood {
        let (body, _, id) = task.await.unwrap();
        assert!(body.is_err());
        sent_ids.push(id);
    }
    assert_eq!(counters(admin).await, [0, 0, 0, FLOOD]);
    let lines = wait_cut_lines(&proxy, 1).await;
    // The first line was written by now: 11 s from here are 11 s after it, however long the
    // flood took on a loaded machine.
    let first = Instant::now();
    assert_eq!(lines[0]["upstream"], "feeds");
    assert_eq!(lines[0]["suppressed"], 0);
    // The DEBUG lines of the cuts not logged at WARN (written as each cut is counted; the
    // log thread may lag a little).
    let deadline = Instant::now() + Duration::from_secs(5);
    let logged_ids = loop {
        let mut ids: Vec<String> = proxy
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| {
                v["target"] == "countersign::proxy::upstream_pool"
                    && v["upstream"] == "feeds"
                    && v["kind"] == "broken"
            })
            .map(|v| v["request_id"].as_str().unwrap_or("(none)").to_owned())
            .collect();
        if ids.len() >= FLOOD as usize || Instant::now() >= deadline {
            ids.sort();
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    sent_ids.sort();
    assert_eq!(logged_ids, sent_ids, "{}", proxy.log());

    // Another upstream's cut gets its own line at once.
    let (body, _) = fetch(addr, "/events/reset").await;
    assert!(body.is_err());
    let lines = wait_cut_lines(&proxy, 2).await;
    assert_eq!(lines[1]["upstream"], "events");
    assert_eq!(lines[1]["suppressed"], 0);

    // 10 s after the first line (whole wall-clock seconds), the next cut is logged with the
    // count of the ones that were not.
    let wait = Duration::from_secs(11).saturating_sub(first.elapsed());
    tokio::time::sleep(wait).await;
    let (body, _) = fetch(addr, "/feeds/reset").await;
    assert!(body.is_err());
    let lines = wait_cut_lines(&proxy, 3).await;
    assert_eq!(lines[2]["upstream"], "feeds", "{}", lines[2]);
    assert_eq!(lines[2]["suppressed"], FLOOD - 1, "{}", lines[2]);
    assert_eq!(counters(admin).await, [0, 1, 0, FLOOD + 1]);
}

//! `server.max_body_memory_per_client`: the most of `server.max_body_memory` one client may
//! hold at once. Before it, one client (a signed-in user with an HTTP/2 connection of slow
//! uploads, or one address posting to a public route) could hold the whole cap, and every
//! other user's bodies were answered 503 `body_memory_limit` until it let go. Now a body that
//! would take its client past its share is answered 429 `client_body_memory_limit`
//! (`Retry-After: 1`), before any byte of it is read when its length is declared, while other
//! clients' bodies pass. A client is the session's user on routes that require a session, the
//! client address on public routes and for the login body.
#![cfg(feature = "proxy")]

mod support;
mod support_h2;
mod support_reload;
mod support_run;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, StreamBody};
use support::*;
use support_reload::*;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpSocket, TcpStream};

/// One client's share: what a route's body may be at most, too.
const PER_CLIENT: usize = 64 * 1024;
/// The cap on all bodies: four clients' shares.
const CAP: usize = 4 * PER_CLIENT;

/// A proxy whose bodies may take [`CAP`] bytes at once, [`PER_CLIENT`] of them for one client;
/// `/api/` (session) and `/public/` (no session) take bodies up to [`PER_CLIENT`].
async fn shared() -> Harness {
    Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, up| {
            s.max_body_memory = CAP;
            s.max_body_memory_per_client = Some(PER_CLIENT);
            let mut public = route("public", "/public/", &up.url());
            public.auth_required = false;
            s.routes.push(public);
            for route in &mut s.routes {
                route.max_body = PER_CLIENT;
            }
        }),
        ..HarnessOptions::default()
    })
    .await
}

/// Waits until the gauge `name` reads `expected` (the proxy reads what it is sent on its own
/// schedule).
async fn gauge_becomes(h: &Harness, name: &str, expected: u64) {
    for _ in 0..500 {
        if gauge(h.admin, name).await == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{name} stayed {} (expected {expected})",
        gauge(h.admin, name).await
    );
}

async fn held_becomes(h: &Harness, expected: u64) {
    gauge_becomes(h, "countersign_body_memory_bytes", expected).await;
}

/// A connection to the proxy from `from` (127.0.0.1, 127.0.0.2: both loopback on Linux).
async fn connect_from(h: &Harness, from: [u8; 4]) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(h.addr).await.unwrap()
}

/// A POST to `path` whose head (with `framing`, and the session's cookie and token when
/// `login` is given) is sent from `from`, and `first` bytes of body.
async fn start_post(
    h: &Harness,
    from: [u8; 4],
    path: &str,
    login: Option<&Login>,
    framing: &str,
    first: &[u8],
) -> TcpStream {
    let mut stream = connect_from(h, from).await;
    let session = login.map_or(String::new(), |login| {
        format!(
            "cookie: {}\r\nx-csrf-token: {}\r\n",
            login.cookie, login.csrf
        )
    });
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: app.test\r\norigin: {ORIGIN}\r\n{session}\
         content-type: application/json\r\n{framing}\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(first).await.unwrap();
    stream
}

/// The whole POST of `length` bytes of `fill` (declared), and its answer.
async fn post_whole(
    h: &Harness,
    from: [u8; 4],
    path: &str,
    login: Option<&Login>,
    length: usize,
) -> String {
    let body = vec![b'b'; length];
    let framing = format!("content-length: {length}\r\n");
    let mut stream = start_post(h, from, path, login, &framing, &body).await;
    whole_answer(&mut stream).await
}

fn assert_refused_429(answer: &str) {
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(
        answer.contains(r#"{"error":"client_body_memory_limit"}"#),
        "{answer}"
    );
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1\r\n"),
        "{answer}"
    );
}

const LOCAL: [u8; 4] = [127, 0, 0, 1];
const OTHER: [u8; 4] = [127, 0, 0, 2];

/// The case the setting is for: user A holds its share with a slow upload; A's next body is
/// refused 429 on its declared length alone (no byte of it sent), while user B's body of the
/// same size passes at the same moment. Nothing refused reaches the upstream, and the global
/// cap refused nothing. Once A's upload ends, its share is given back and A's next body
/// passes; the table of clients is empty again.
#[tokio::test]
async fn a_user_holding_its_share_is_refused_while_another_user_passes() {
    let h = shared().await;
    let alice = h.login("alice", ALICE_PASSWORD).await;
    let bob = h.login("bob", BOB_PASSWORD).await;
    assert_eq!(
        gauge(h.admin, "countersign_body_memory_per_client_limit_bytes").await,
        PER_CLIENT as u64
    );

    let body = vec![b'a'; 40_000];
    let mut first = start_post(
        &h,
        LOCAL,
        "/api/notes",
        Some(&alice),
        "content-length: 40000\r\n",
        &body[..1000],
    )
    .await;
    held_becomes(&h, 40_000).await;
    assert_eq!(gauge(h.admin, "countersign_body_memory_clients").await, 1);

    // 40000 + 30000 > 65536 for alice: refused on its head alone (no byte of body sent),
    // though the cap (262144) has room.
    let mut second = start_post(
        &h,
        LOCAL,
        "/api/notes",
        Some(&alice),
        "content-length: 30000\r\n",
        b"",
    )
    .await;
    assert_refused_429(&whole_answer(&mut second).await);
    assert_eq!(h.upstream.raw_count(), 0, "nothing forwarded");
    // Another connection of alice's (another session too) is the same client.
    let alice2 = h.login("alice", ALICE_PASSWORD).await;
    let refused = post_whole(&h, OTHER, "/api/notes", Some(&alice2), 30_000).await;
    assert_refused_429(&refused);
    assert_eq!(h.upstream.raw_count(), 0, "nothing forwarded");

    // Bob, the same body, the same moment, the same address even: passes.
    let passed = post_whole(&h, LOCAL, "/api/notes", Some(&bob), 30_000).await;
    assert!(passed.starts_with("HTTP/1.1 200"), "{passed}");
    assert_eq!(h.upstream.raw_count(), 1);

    // Alice's first body ends: forwarded, and her share given back.
    first.write_all(&body[1000..]).await.unwrap();
    let done = whole_answer(&mut first).await;
    assert!(done.starts_with("HTTP/1.1 200"), "{done}");
    held_becomes(&h, 0).await;
    gauge_becomes(&h, "countersign_body_memory_clients", 0).await;
    let again = post_whole(&h, LOCAL, "/api/notes", Some(&alice), 30_000).await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    assert_eq!(h.upstream.raw_count(), 3);

    assert_eq!(
        gauge(h.admin, "countersign_body_memory_client_refused_total").await,
        2
    );
    assert_eq!(
        gauge(h.admin, "countersign_body_memory_refused_total").await,
        0,
        "the cap refused nothing"
    );
    let scrape = send(h.admin, Method::GET, "/metrics", &[], "").await.text();
    for line in [
        "# TYPE countersign_body_memory_client_refused_total counter\n",
        "# TYPE countersign_body_memory_per_client_limit_bytes gauge\n",
        "# TYPE countersign_body_memory_clients gauge\n",
        "countersign_refusals_total{reason=\"client_body_memory_limit\"} 2\n",
        "countersign_refusals_total{reason=\"body_memory_limit\"} 0\n",
    ] {
        assert!(scrape.contains(line), "{line} in:\n{scrape}");
    }
    held_becomes(&h, 0).await;
    gauge_becomes(&h, "countersign_body_memory_clients", 0).await;
}

/// On a public route (and for the login body) the client is the address: an address holding
/// its whole share is refused, another address's body passes at the same moment; when the
/// holder disconnects mid-body its share is given back, and the table is empty.
#[tokio::test]
async fn on_a_public_route_the_client_is_the_address() {
    let h = shared().await;
    let body = vec![b'p'; PER_CLIENT];
    let holder = start_post(
        &h,
        LOCAL,
        "/public/upload",
        None,
        &format!("content-length: {PER_CLIENT}\r\n"),
        &body[..1000],
    )
    .await;
    held_becomes(&h, PER_CLIENT as u64).await;

    let refused = post_whole(&h, LOCAL, "/public/upload", None, 1000).await;
    assert_refused_429(&refused);
    // The login's body, from the same address: the same client, refused before it is read
    // (and before any credential is checked or counted).
    let login = login_at(h.addr, "alice", ALICE_PASSWORD).await;
    assert_eq!(
        login.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        login.text()
    );
    assert_eq!(login.error_code(), "client_body_memory_limit");
    assert_eq!(h.upstream.raw_count(), 0, "nothing forwarded");

    // Another address: passes.
    let passed = post_whole(&h, OTHER, "/public/upload", None, 30_000).await;
    assert!(passed.starts_with("HTTP/1.1 200"), "{passed}");
    assert_eq!(h.upstream.raw_count(), 1);

    // The holder goes away mid-body: its share is given back, its entry removed.
    drop(holder);
    held_becomes(&h, 0).await;
    gauge_becomes(&h, "countersign_body_memory_clients", 0).await;
    let again = post_whole(&h, LOCAL, "/public/upload", None, 30_000).await;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    assert_eq!(
        gauge(h.admin, "countersign_body_memory_client_refused_total").await,
        2
    );
    held_becomes(&h, 0).await;
    gauge_becomes(&h, "countersign_body_memory_clients", 0).await;
}

/// A chunked body (no length announced) takes its bytes as they arrive; the chunk that would
/// take its user past the share is refused 429 then, mid-body, and the bytes it held are
/// given back. Nothing is forwarded, and the refused write does not extend the session.
#[tokio::test]
async fn a_chunked_body_is_refused_part_way_and_the_session_is_not_touched() {
    let h = shared().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let holder = start_post(
        &h,
        LOCAL,
        "/api/notes",
        Some(&login),
        "content-length: 50000\r\n",
        b"x",
    )
    .await;
    held_becomes(&h, 50_000).await;

    let chunk = |n: usize| {
        let mut c = format!("{n:x}\r\n").into_bytes();
        c.extend(std::iter::repeat_n(b'y', n));
        c.extend_from_slice(b"\r\n");
        c
    };
    let mut chunked = start_post(
        &h,
        LOCAL,
        "/api/notes",
        Some(&login),
        "transfer-encoding: chunked\r\n",
        &chunk(10_000),
    )
    .await;
    held_becomes(&h, 60_000).await;
    // The session's idle timer before the refused write.
    h.clock.advance(60);
    chunked.write_all(&chunk(10_000)).await.unwrap();
    assert_refused_429(&whole_answer(&mut chunked).await);
    held_becomes(&h, 50_000).await;
    assert_eq!(h.upstream.raw_count(), 0);
    drop(holder);
    held_becomes(&h, 0).await;
    gauge_becomes(&h, "countersign_body_memory_clients", 0).await;
    // Not touched by the refused write: the session ends at its idle timeout counted from
    // the login (now one second past it), not from the refusal.
    h.clock.advance(IDLE.as_secs() - 59);
    let after = get(h.addr, "/api/x", &login).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED, "{}", after.text());
}

/// One HTTP/2 connection of one user opening many streams, each with a body sent in part and
/// held: only the user's share is read (4 bodies of 16 KiB against 64 KiB), the other streams
/// are answered 429 at once; another user's body still passes meanwhile. When the streams go,
/// the table is empty.
#[tokio::test]
async fn one_http2_connection_holds_at_most_its_users_share() {
    let h = shared().await;
    let alice = h.login("alice", ALICE_PASSWORD).await;
    let bob = h.login("bob", BOB_PASSWORD).await;
    let mut sender = support_h2::h2c(h.addr).await;
    let mut feeds = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..12 {
        let (feed, frames) =
            tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(4);
        feed.send(Ok(http_body::Frame::data(Bytes::from(vec![b'z'; 1024]))))
            .await
            .unwrap();
        let request = Request::post("http://app.test/api/notes")
            .header("origin", ORIGIN)
            .header("cookie", &alice.cookie)
            .header("x-csrf-token", &alice.csrf)
            .header("content-type", "application/json")
            .header("content-length", "16384")
            .body(StreamBody::new(futures_util::stream::poll_fn({
                let mut frames = frames;
                move |cx| frames.poll_recv(cx)
            })))
            .unwrap();
        sender.ready().await.unwrap();
        answers.push(tokio::spawn(sender.send_request(request)));
        feeds.push(feed);
    }
    let mut refused = 0;
    for answer in answers {
        if let Ok(done) = tokio::time::timeout(Duration::from_millis(500), answer).await {
            let response = done.unwrap().unwrap();
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], br#"{"error":"client_body_memory_limit"}"#);
            refused += 1;
        }
    }
    assert_eq!(refused, 8, "8 of 12 streams refused");
    assert_eq!(
        gauge(h.admin, "countersign_body_memory_bytes").await,
        4 * 16384
    );
    let passed = post_whole(&h, LOCAL, "/api/notes", Some(&bob), 30_000).await;
    assert!(passed.starts_with("HTTP/1.1 200"), "{passed}");
    assert_eq!(h.upstream.raw_count(), 1, "only bob's body forwarded");
    drop(feeds);
    held_becomes(&h, 0).await;
    gauge_becomes(&h, "countersign_body_memory_clients", 0).await;
}

/// `"off"`: no client is counted; one user may hold the whole cap (the global 503 is then
/// the only limit), and the gauge reads 0.
#[tokio::test]
async fn off_leaves_only_the_global_cap() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(|s, _| {
            s.max_body_memory = CAP;
            s.max_body_memory_per_client = None;
        }),
        ..HarnessOptions::default()
    })
    .await;
    let alice = h.login("alice", ALICE_PASSWORD).await;
    let holder = start_post(
        &h,
        LOCAL,
        "/api/notes",
        Some(&alice),
        "content-length: 60000\r\n",
        b"x",
    )
    .await;
    held_becomes(&h, 60_000).await;
    let passed = post_whole(&h, LOCAL, "/api/notes", Some(&alice), 60_000).await;
    assert!(passed.starts_with("HTTP/1.1 200"), "{passed}");
    assert_eq!(
        gauge(h.admin, "countersign_body_memory_per_client_limit_bytes").await,
        0
    );
    assert_eq!(gauge(h.admin, "countersign_body_memory_clients").await, 0);
    drop(holder);
    held_becomes(&h, 0).await;
}

/// `server.max_body_memory_per_client` is live: a reload's value is the limit at once
/// (`/metrics`), `"off"` turns it off, a file without it gets the default (a quarter of
/// `max_body_memory`, raised to the largest body), and a file that sets it below a route's
/// `max_body` is refused whole, naming both keys, the running limit kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_the_per_client_limit() {
    let upstream = serve_each(|_stream| async {}).await;
    let server =
        |extra: &str| format!("shutdown_grace = \"2s\"\nmax_body_memory = \"4MiB\"\n{extra}");
    let running = start_reloadable(
        "body-memory-per-client-reload",
        &server(""),
        "",
        &format!("http://{upstream}"),
        "max_body = \"512KiB\"",
    );
    let limit = "countersign_body_memory_per_client_limit_bytes";
    assert_eq!(
        gauge(running.admin, limit).await,
        1 << 20,
        "default: a quarter"
    );
    running.reload(
        &server("max_body_memory_per_client = \"2MiB\""),
        "",
        "max_body_memory_per_client",
    );
    assert_eq!(gauge(running.admin, limit).await, 2 << 20);
    running.reload(
        &server("max_body_memory_per_client = \"off\""),
        "",
        "max_body_memory_per_client",
    );
    assert_eq!(gauge(running.admin, limit).await, 0);
    running.reload(
        &server("max_body_memory_per_client = \"1MiB\""),
        "",
        "max_body_memory_per_client",
    );
    assert_eq!(gauge(running.admin, limit).await, 1 << 20);
    // Below the route's 512 KiB: the file is invalid, nothing of it applied.
    running.reload_text(&running.text(&server("max_body_memory_per_client = \"256KiB\""), ""));
    assert_eq!(gauge(running.admin, limit).await, 1 << 20);
    let log = running.proxy.log();
    assert!(
        log.contains("server.max_body_memory_per_client")
            && log.contains("262144 bytes is less than upstream[0].max_body (524288 bytes)"),
        "{log}"
    );
    // Unset again, with a larger cap: the default follows the cap (a quarter of 8 MiB).
    running.reload(
        "shutdown_grace = \"2s\"\nmax_body_memory = \"8MiB\"",
        "",
        "max_body_memory",
    );
    assert_eq!(gauge(running.admin, limit).await, 2 << 20);
}

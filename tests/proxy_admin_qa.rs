//! The admin listener under adversarial use: what its endpoints cost the session store and the
//! upstreams when probes pile up. A real proxy on loopback (the in-process harness), a session
//! store that counts and slows its readiness checks, and an upstream that counts the TCP
//! connections made to it.
//! Run: `cargo test --all-features --test proxy_admin_qa`.
#![cfg(feature = "proxy")]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use countersign::core::Identity;
use countersign::proxy::session::{BoxFuture, Session, SessionId, SessionStore, StoreError};
use http::{Method, StatusCode};
use support::*;

/// A session store whose readiness check (a Redis round trip in production) takes `delay` and
/// is counted; everything else is unused here and fails.
struct SlowReadyStore {
    ready_calls: Arc<AtomicUsize>,
    delay: Duration,
}

fn unused<'a, T: Send + 'a>() -> BoxFuture<'a, Result<T, StoreError>> {
    Box::pin(async { Err(StoreError::new("not used by this test")) })
}

impl SessionStore for SlowReadyStore {
    fn create<'a>(
        &'a self,
        _: &'a Identity,
        _: u64,
    ) -> BoxFuture<'a, Result<(SessionId, Session), StoreError>> {
        unused()
    }
    fn get<'a>(
        &'a self,
        _: &'a SessionId,
        _: u64,
        _: bool,
    ) -> BoxFuture<'a, Result<Option<Session>, StoreError>> {
        unused()
    }
    fn delete<'a>(&'a self, _: &'a SessionId) -> BoxFuture<'a, Result<(), StoreError>> {
        unused()
    }
    fn delete_user<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<usize, StoreError>> {
        unused()
    }
    fn count(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async { Ok(0) })
    }
    fn ready(&self) -> BoxFuture<'_, bool> {
        self.ready_calls.fetch_add(1, Ordering::SeqCst);
        let delay = self.delay;
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            true
        })
    }
}

/// A TCP listener that accepts and counts connections (what a readiness probe makes), and
/// closes them.
async fn counting_listener() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (url, accepted)
}

/// `/readyz` is "reused for 2 s: probes more frequent than that cost nothing" (OPERATIONS.md):
/// that must hold for probes that arrive together too. Twenty probes sent at once, while the
/// store's check takes 500 ms, cost one store check and one TCP connect per upstream, and all
/// get that check's answer. Before, each probe arriving while a check ran (up to the Redis
/// deadline, or 1 s with an upstream down) started its own: a burst of probes (several
/// balancers and kubelets, or one client opening many admin connections or HTTP/2 streams) was
/// a burst of Redis round trips and upstream connects, exactly when those were struggling.
#[tokio::test]
async fn probes_arriving_during_a_readiness_check_share_it() {
    let ready_calls = Arc::new(AtomicUsize::new(0));
    let (probed_url, probed) = counting_listener().await;
    let h = Harness::start_with(HarnessOptions {
        extra_routes: vec![route("probed", "/probed/", &probed_url)],
        sessions: Some(Arc::new(SlowReadyStore {
            ready_calls: ready_calls.clone(),
            delay: Duration::from_millis(500),
        })),
        ..HarnessOptions::default()
    })
    .await;
    let admin = h.admin;
    let probes: Vec<_> = (0..20)
        .map(|_| tokio::spawn(send(admin, Method::GET, "/readyz", &[], Bytes::new())))
        .collect();
    for probe in probes {
        let reply = probe.await.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let body = reply.json();
        assert_eq!(body["ready"], true, "{body}");
        assert_eq!(body["upstreams"]["probed"]["up"], true, "{body}");
    }
    assert_eq!(
        ready_calls.load(Ordering::SeqCst),
        1,
        "20 concurrent /readyz probes each ran the session store's readiness check"
    );
    assert_eq!(
        probed.load(Ordering::SeqCst),
        1,
        "20 concurrent /readyz probes each connected to the upstream"
    );
    // A /metrics scrape within the 2 s reuses the upstream probes too.
    let scrape = send(admin, Method::GET, "/metrics", &[], Bytes::new()).await;
    assert!(
        scrape
            .text()
            .contains("\ncountersign_upstream_up{upstream=\"probed\"} 1\n"),
        "{}",
        scrape.text()
    );
    assert_eq!(probed.load(Ordering::SeqCst), 1);
}

/// `/readyz` is "back to 200 by itself at the first check after the store and the required
/// upstreams answer again" (OPERATIONS.md). An upstream down at a `/metrics` scrape and back
/// up just after: the next `/readyz` check probes it and is ready. Before, the check reused the
/// scrape's probe (kept for 2 s) and answered 503 with `"up":false`, and that answer was then
/// kept 2 s more: an upstream back up stayed "down" for up to twice the documented 2 s.
#[tokio::test]
async fn a_readiness_check_probes_the_upstreams_itself() {
    // Connects are refused, until it listens.
    let (late, late_addr) = refusing_addr();
    let late_url = format!("http://{late_addr}");
    let h = Harness::start_with(HarnessOptions {
        extra_routes: vec![route("late", "/late/", &late_url)],
        ..HarnessOptions::default()
    })
    .await;
    let scrape = send(h.admin, Method::GET, "/metrics", &[], Bytes::new())
        .await
        .text();
    assert!(
        scrape.contains("\ncountersign_upstream_up{upstream=\"late\"} 0\n"),
        "{scrape}"
    );
    let _listening = late.listen(16).unwrap();
    let reply = send(h.admin, Method::GET, "/readyz", &[], Bytes::new()).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["upstreams"]["late"]["up"], true);
    // And the scrape that follows reuses that check's probe.
    let scrape = send(h.admin, Method::GET, "/metrics", &[], Bytes::new())
        .await
        .text();
    assert!(
        scrape.contains("\ncountersign_upstream_up{upstream=\"late\"} 1\n"),
        "{scrape}"
    );
}

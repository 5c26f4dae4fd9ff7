//! A Redis failover behind a stable address (a DNS name or TCP proxy that follows the
//! primary), on real `redis-server`s: a primary with a replica, then the replica promoted and
//! the old primary demoted to its replica. The live connection stays on the demoted server,
//! which answers `PING` but refuses every write with `READONLY`: the connection must be
//! replaced (the first call after the failover already reaching the new primary), readiness
//! must say not-ready while only a replica is reachable, and nonces recorded before the
//! failover (replicated) must stay refused after it.
//! Run: `cargo test --all-features --test redis_failover`.
#![cfg(feature = "redis")]

mod support_redis;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use countersign::replay::{
    RedisConnection, RedisOptions, RedisReplayCache, ReplayCache, ReplayOutcome,
};
use support_redis::{primary_and_replica, wait_until, RedisServer};
use tokio::net::{TcpListener, TcpStream};

const NOW: u64 = 1_000_000;
const PREFIX: &str = "failover:";

fn options() -> RedisOptions {
    RedisOptions {
        op_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        ping_timeout: Duration::from_millis(500),
    }
}

/// Forwards loopback connections to a target that can be switched: connections made before a
/// switch stay on the old target, as they do behind a DNS name or an L4 proxy.
struct Forwarder {
    addr: SocketAddr,
    target: Arc<Mutex<SocketAddr>>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    async fn start(target: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let target = Arc::new(Mutex::new(target));
        let accepted = Arc::new(AtomicU64::new(0));
        let (current, count) = (target.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let to = *current.lock().unwrap();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(to).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Forwarder {
            addr,
            target,
            accepted,
            task,
        }
    }

    fn url(&self, query: &str) -> String {
        format!("redis://{}/0{query}", self.addr)
    }

    fn switch_to(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }

    fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until `key`, written on the primary, is on `replica` (so the failover keeps it).
fn wait_replicated(replica: &RedisServer, key: &str) {
    wait_until("the nonce to replicate", Duration::from_secs(10), || {
        replica.cli(&["EXISTS", key]) == "1"
    });
}

/// Promotes `replica` and demotes `primary` to its replica, as a failover does; returns once
/// the old primary refuses writes.
fn fail_over(primary: &RedisServer, replica: &RedisServer) {
    replica.cli(&["REPLICAOF", "NO", "ONE"]);
    let port = replica.addr().port().to_string();
    primary.cli(&["REPLICAOF", "127.0.0.1", &port]);
    wait_until(
        "the old primary to refuse writes",
        Duration::from_secs(10),
        || {
            primary
                .cli(&["SET", "failover:probe", "1"])
                .contains("READONLY")
        },
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_call_after_a_failover_reaches_the_new_primary() {
    let (old_primary, new_primary) = primary_and_replica(&[]);
    let forwarder = Forwarder::start(old_primary.addr()).await;
    let connection = RedisConnection::with_options(&forwarder.url(""), options()).unwrap();
    let cache = RedisReplayCache::new(connection, PREFIX);
    assert_eq!(
        cache.check_and_record("before", NOW + 30, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    wait_replicated(&new_primary, "failover:before");
    assert_eq!(forwarder.connections(), 1);

    fail_over(&old_primary, &new_primary);
    forwarder.switch_to(new_primary.addr());

    // The write on the demoted server is refused (READONLY: not executed), so the call is made
    // once more on a new connection, which reaches the new primary: no request fails.
    assert_eq!(
        cache.check_and_record("after", NOW + 30, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(forwarder.connections(), 2, "one new connection");
    assert_eq!(new_primary.cli(&["EXISTS", "failover:after"]), "1");
    assert_eq!(old_primary.cli(&["GET", "failover:probe"]), "");
    // The retried write counted once, and the nonce from before the failover replicated:
    // both are replays now.
    assert_eq!(
        cache.check_and_record("after", NOW + 30, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
    assert_eq!(
        cache.check_and_record("before", NOW + 30, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
    assert!(cache.ready().await);
    assert_eq!(forwarder.connections(), 2, "and the new connection is kept");
}

/// Readiness while only a replica is reachable, in both protocols (the `HELLO` reply that
/// tells the role is a flat list in RESP2 and a map in RESP3).
async fn readiness_follows_the_role(query: &str) {
    let (old_primary, new_primary) = primary_and_replica(&[]);
    let forwarder = Forwarder::start(old_primary.addr()).await;
    let connection = RedisConnection::with_options(&forwarder.url(query), options()).unwrap();
    let cache = RedisReplayCache::new(connection, PREFIX);
    assert!(cache.ready().await, "ready on the primary");
    assert_eq!(
        cache.check_and_record("before", NOW + 30, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    wait_replicated(&new_primary, "failover:before");

    // The address still leads to the demoted server: it answers PING, but it is a replica, so
    // not ready, and no nonce is accepted (fail closed).
    fail_over(&old_primary, &new_primary);
    assert!(
        !cache.ready().await,
        "not ready while connected to a replica"
    );
    assert!(cache
        .check_and_record("during", NOW + 30, NOW)
        .await
        .is_err());
    assert!(!cache.ready().await, "still not ready");

    // The address follows the failover: ready again, without a restart.
    forwarder.switch_to(new_primary.addr());
    assert!(cache.ready().await, "ready on the new primary");
    assert_eq!(
        cache.check_and_record("before", NOW + 30, NOW).await,
        Ok(ReplayOutcome::Replayed),
        "a nonce recorded before the failover is still refused after it"
    );
    assert_eq!(
        cache.check_and_record("during", NOW + 30, NOW).await,
        Ok(ReplayOutcome::Fresh),
        "the refused write during the failover recorded nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_false_on_a_replica_and_true_after_the_failover() {
    readiness_follows_the_role("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_false_on_a_replica_and_true_after_the_failover_resp3() {
    readiness_follows_the_role("?protocol=resp3").await;
}

/// A URL that leads straight to a replica (a misconfiguration): never ready, nothing accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_is_never_ready() {
    let (_primary, replica) = primary_and_replica(&[]);
    let connection = RedisConnection::with_options(&replica.url(), options()).unwrap();
    let cache = RedisReplayCache::new(connection, PREFIX);
    assert!(!cache.ready().await);
    assert!(cache.check_and_record("n", NOW + 30, NOW).await.is_err());
    assert!(!cache.ready().await);
}

/// A server without `HELLO` (renamed away here, as some managed services do; Redis before 6.2
/// or a proxy without it alike) is judged by the `PING` alone: still ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_falls_back_to_ping_without_hello() {
    let server = RedisServer::start_with(&["--rename-command", "HELLO", "HELLO-DISABLED-FOR-TEST"]);
    assert!(server.cli(&["HELLO"]).contains("unknown command"));
    let connection = RedisConnection::with_options(&server.url(), options()).unwrap();
    let cache = RedisReplayCache::new(connection, PREFIX);
    assert!(cache.ready().await);
    assert_eq!(
        cache.check_and_record("n", NOW + 30, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert!(cache.ready().await);
}

/// The proxy's session store shares the connection code: logins (session writes) go on right
/// after the failover, the first one already on the new primary.
#[cfg(feature = "proxy")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_store_goes_on_after_a_failover() {
    use countersign::proxy::session::{SessionStore, SessionTimeouts};
    use countersign::proxy::session_redis::RedisSessionStore;
    let (old_primary, new_primary) = primary_and_replica(&[]);
    let forwarder = Forwarder::start(old_primary.addr()).await;
    let connection = RedisConnection::with_options(&forwarder.url(""), options()).unwrap();
    let timeouts = SessionTimeouts {
        idle: Duration::from_secs(1800),
        absolute: Duration::from_secs(43200),
    };
    let store = RedisSessionStore::new(connection, PREFIX, timeouts, 1000);
    let alice = countersign::Identity::new("alice", ["admin"]);
    let (before, _) = store.create(&alice, NOW).await.unwrap();
    wait_until("the session to replicate", Duration::from_secs(10), || {
        !new_primary
            .cli(&["KEYS", &format!("{PREFIX}session:*")])
            .is_empty()
    });

    fail_over(&old_primary, &new_primary);
    forwarder.switch_to(new_primary.addr());

    let (after, _) = store.create(&alice, NOW + 1).await.unwrap();
    assert!(store.get(&after, NOW + 2, false).await.unwrap().is_some());
    // The session from before the failover (replicated) lives on.
    assert!(store.get(&before, NOW + 2, false).await.unwrap().is_some());
    assert!(store.ready().await);
}

//! Redis Cluster, on real processes: three `redis-server --cluster-enabled yes` nodes joined
//! with `redis-cli --cluster create` (tests/support_redis, `RedisCluster`).
//!
//! The library: the replay cache accepts a nonce once across two connections ("processes"),
//! its nonces spread over the primaries; a primary with an evicting `maxmemory-policy` is
//! refused, named, at connect time and at readiness, and so is a primary older than 7.0 (its
//! `HELLO` version rewritten by a relay); a stopped or hung primary fails the calls it serves
//! closed within the deadline (and readiness), and the cluster connection recovers by itself
//! once it is back. The proxy: `[session] redis_cluster_nodes` runs sessions and the
//! login throttle on the cluster across two proxy processes (login on one, signed request and
//! logout on the other), with every key of the stores in one slot (the hash tag); and the
//! config errors of cluster mode (no hash tag, with sentinels, a host in `redis_url`, a
//! database) make `check-config` and `run` exit non-zero naming the key.
//! Run: `cargo test --all-features --test redis_cluster`.
#![cfg(feature = "proxy")]

mod support;
mod support_cli;
mod support_fleet;
mod support_redis;
mod support_run;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use countersign::replay::{
    RedisConnection, RedisOptions, RedisReplayCache, ReplayCache, ReplayOutcome,
};
use http::{Method, StatusCode};
use support_cli::check_config;
use support_fleet::{
    error_code, login, login_ok, must, start_api, Browser, FleetFiles, ProxyProcess,
    ALICE_PASSWORD, BIN, ORIGIN,
};
use support_redis::forwarder::ReplyRewriter;
use support_redis::{wait_until, RedisCluster};

const NOW: u64 = 1_000_000;

fn options() -> RedisOptions {
    RedisOptions {
        op_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_secs(1),
        ping_timeout: Duration::from_millis(500),
    }
}

/// A connection of its own to the cluster (one process).
fn cluster_connection(cluster: &RedisCluster) -> RedisConnection {
    RedisConnection::cluster(&cluster.node_urls(), options()).unwrap()
}

/// A replay cache on a cluster connection of its own (one API process).
fn cache(cluster: &RedisCluster) -> RedisReplayCache {
    RedisReplayCache::new(cluster_connection(cluster), "cluster:nonce:")
}

// ---------------------------------------------------------------------------------------------
// The library
// ---------------------------------------------------------------------------------------------

/// `count` nonces `{prefix}-{i}` whose keys (`cluster:nonce:` prefix) primary `node` serves.
fn nonces_on(cluster: &RedisCluster, node: usize, prefix: &str, count: usize) -> Vec<String> {
    let nonces: Vec<String> = (0..300)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|nonce| cluster.node_of(&format!("cluster:nonce:{nonce}")) == node)
        .take(count)
        .collect();
    assert_eq!(nonces.len(), count, "{prefix}: nonces on node {node}");
    nonces
}

/// With the primary serving `nonces` stopped or hung (`state`): every call for them fails
/// (never `Fresh`, never a pass), each within `call_bound`, and readiness says not ready within
/// `ready_bound`.
async fn assert_fails_closed(
    running: &RedisReplayCache,
    nonces: &[String],
    call_bound: Duration,
    ready_bound: Duration,
    state: &str,
) {
    for nonce in nonces {
        let started = Instant::now();
        let outcome = running.check_and_record(nonce, NOW + 60, NOW).await;
        let took = started.elapsed();
        assert!(
            outcome.is_err(),
            "{nonce}: {outcome:?} with its primary {state}"
        );
        assert!(took < call_bound, "{nonce}: {took:?}");
    }
    let started = Instant::now();
    assert!(!running.ready().await, "ready with a primary {state}");
    assert!(started.elapsed() < ready_bound, "{:?}", started.elapsed());
}

/// Makes node `index` announce `port` (a forwarder's in front of it) to clients, its bus port
/// unchanged, and waits until every node's slot map names that port: clients then reach it
/// only through the forwarder.
fn announce_through(cluster: &RedisCluster, index: usize, port: u16) {
    let node = &cluster.nodes[index];
    let port = port.to_string();
    let bus_port = (u32::from(node.addr().port()) + 10_000).to_string();
    assert_eq!(
        node.cli(&["CONFIG", "SET", "cluster-announce-bus-port", &bus_port])
            .trim(),
        "OK"
    );
    assert_eq!(
        node.cli(&["CONFIG", "SET", "cluster-announce-port", &port])
            .trim(),
        "OK"
    );
    wait_until(
        "the forwarder's port in every slot map",
        Duration::from_secs(20),
        || {
            cluster.nodes.iter().all(|n| {
                n.cli(&["CLUSTER", "NODES"]).lines().any(|l| {
                    l.contains("myself") == std::ptr::eq(n, node)
                        && l.contains(&format!(":{port}@"))
                })
            })
        },
    );
}

/// A nonce's `SET NX GET` whose reply is lost with a node's connection on a cluster: the
/// crate's cluster client repeats the call itself on a new connection (countersign does not
/// see it), and that repeat finds the token of its own first try, so the first use is
/// `Fresh`, not a replay of itself. Before the token, this answered `Replayed` (401 to a
/// legitimate request). Node 0 announces a reply cutter's port in front of its own, so the
/// client reaches it through the cutter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_use_whose_reply_was_lost_on_a_cluster_is_fresh_once() {
    let cluster = RedisCluster::start(3);
    let node = &cluster.nodes[0];
    let cutter = support_redis::forwarder::ReplyCutter::start(node.addr(), b"$3\r\nSET\r\n").await;
    announce_through(&cluster, 0, cutter.forwarder.addr.port());
    // Seeded through the other nodes: node 0 is reached only where the slot map says.
    let seeds: Vec<String> = cluster.nodes[1..].iter().map(|n| n.url()).collect();
    let running = RedisReplayCache::new(
        RedisConnection::cluster(&seeds, options()).unwrap(),
        "cluster:nonce:",
    );
    let nonces = nonces_on(&cluster, 0, "cut", 2);
    assert_eq!(
        running.check_and_record(&nonces[0], NOW + 10, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    let before = cutter.connections();
    assert!(before >= 1, "node 0 was not reached through the cutter");

    cutter.arm();
    let outcome = running.check_and_record(&nonces[1], NOW + 10, NOW).await;
    let key = format!("cluster:nonce:{}", nonces[1]);
    assert_eq!(
        node.cli(&["STRLEN", &key]).trim(),
        "16",
        "the first try's token"
    );
    assert!(
        cutter.connections() > before,
        "the call was not repeated on a new connection: {outcome:?}"
    );
    assert_eq!(outcome, Ok(ReplayOutcome::Fresh));
    // Any later use is a replay.
    assert_eq!(
        running.check_and_record(&nonces[1], NOW + 10, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
}

/// A primary older than 7.0 makes a cluster not ready, named by its address and version, as a
/// single server is: it answers everything else, but every `SET .. NX GET` of its slots (and
/// the login throttle's `EXPIRE .. NX`) is a syntax error there. No Redis 6 is packaged for
/// the CI, so node 0 is reached through a relay that, once switched on, rewrites the version
/// in its `HELLO` replies (`7.0.15` into `6.0.15`: same length, the RESP framing holds; the
/// bytes are the same in RESP2's array and RESP3's map). The same cluster without the rewrite
/// is ready, before and after. Also for an ACL user without `INFO`, whose check asks each
/// command alone once the pipeline is refused, and then leaves `INFO` out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_older_than_7_makes_a_cluster_not_ready_and_is_named() {
    let cluster = RedisCluster::start_with(
        3,
        &[
            "--user", "noinfo", "on", ">acl-pw", "~*", "&*", "+@all", "-info",
        ],
    );
    // The version as node 0 writes it in `HELLO` (`$6\r\n7.0.15`): its first digit made a 6.
    let info = cluster.nodes[0].cli(&["INFO", "server"]);
    let version = info
        .lines()
        .find_map(|line| line.trim().strip_prefix("redis_version:"))
        .expect("INFO server names redis_version");
    let major = version.as_bytes()[0];
    assert!((b'7'..=b'9').contains(&major), "redis {version}");
    let field = format!("$7\r\nversion\r\n${}\r\n", version.len()).into_bytes();
    let (mut pattern, mut replacement) = (field.clone(), field);
    pattern.push(major);
    replacement.push(b'6');
    let relay = ReplyRewriter::start(cluster.nodes[0].addr(), &pattern, &replacement).await;
    let relay_port = relay.forwarder.addr.port();
    announce_through(&cluster, 0, relay_port);
    // Seeded through the other nodes: node 0 is reached only where the slot map says.
    let seeds = |user: &str| -> Vec<String> {
        cluster.nodes[1..]
            .iter()
            .map(|n| format!("redis://{user}{}", n.addr()))
            .collect()
    };
    let connect = |user: &str| RedisConnection::cluster(&seeds(user), options()).unwrap();
    let (running, without_info) = (connect(""), connect("noinfo:acl-pw@"));
    for connection in [&running, &without_info] {
        if let Err(error) = connection.readiness().await {
            panic!("not ready before the rewrite: {error}");
        }
    }
    assert!(
        relay.connections() >= 2,
        "node 0 was not reached through the relay"
    );
    let policy = without_info.eviction_policy_summary().await.unwrap();
    assert!(policy.contains("not readable"), "{policy}");

    relay.rewrite(true);
    // A new process: refused at connect, its calls fail closed with the same reason.
    let late = RedisReplayCache::new(connect(""), "cluster:nonce:");
    let Err(error) = late.check_and_record("old", NOW + 60, NOW).await else {
        panic!("a nonce was accepted on a cluster with a primary on Redis 6.0");
    };
    // Connections made before (one reading INFO, one leaving it out since it was refused) and
    // new ones (one whose pipeline is refused, so that each command is asked alone).
    let refusals = [
        running.readiness().await.map_err(|e| e.to_string()),
        without_info.readiness().await.map_err(|e| e.to_string()),
        connect("noinfo:acl-pw@")
            .readiness()
            .await
            .map_err(|e| e.to_string()),
        Err(error.to_string()),
    ];
    for (i, refusal) in refusals.into_iter().enumerate() {
        let Err(text) = refusal else {
            panic!("{i}: ready with a primary that says it runs Redis 6.0");
        };
        assert!(
            text.contains(&format!("primary 127.0.0.1:{relay_port}: it runs Redis 6.")),
            "{i}: names the primary and its version: {text}"
        );
        assert!(text.contains("7.0 or later"), "{i}: says the fix: {text}");
        assert_eq!(
            text.matches("it runs Redis").count(),
            1,
            "{i}: only node 0: {text}"
        );
    }

    relay.rewrite(false);
    for connection in [&running, &without_info] {
        if let Err(error) = connection.readiness().await {
            panic!("not ready after the rewrite: {error}");
        }
    }
    assert_eq!(
        late.check_and_record("old", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
}

/// Two caches on two connections, as two API processes: each nonce is fresh once, a replay for
/// both afterwards; the nonces land on every primary (single-key `SET NX GET PX`, one slot each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_cache_on_a_cluster_accepts_a_nonce_once_across_processes() {
    let cluster = RedisCluster::start(3);
    let (first, second) = (cache(&cluster), cache(&cluster));
    assert!(first.ready().await, "readiness on a healthy cluster");
    let endpoint = first.connection().endpoint().to_owned();
    assert!(
        endpoint.starts_with("redis+cluster://127.0.0.1:"),
        "{endpoint}"
    );
    for i in 0..60 {
        let nonce = format!("n-{i}");
        assert_eq!(
            first.check_and_record(&nonce, NOW + 60, NOW).await,
            Ok(ReplayOutcome::Fresh),
            "{nonce}"
        );
        assert_eq!(
            second.check_and_record(&nonce, NOW + 60, NOW).await,
            Ok(ReplayOutcome::Replayed),
            "{nonce} replayed to the other process"
        );
        assert_eq!(
            first.check_and_record(&nonce, NOW + 60, NOW).await,
            Ok(ReplayOutcome::Replayed),
            "{nonce} replayed to the same process"
        );
    }
    let per_node = cluster.keys_per_node("cluster:nonce:*");
    assert_eq!(per_node.iter().sum::<usize>(), 60, "{per_node:?}");
    assert!(
        per_node.iter().all(|&keys| keys > 0),
        "nonces on every primary: {per_node:?}"
    );
    // Each key lives on the node that serves its slot, with its time to live (60 s and the
    // second every key gets on top).
    let owner = cluster.node_of("cluster:nonce:n-7");
    let ttl: i64 = cluster.nodes[owner]
        .cli(&["PTTL", "cluster:nonce:n-7"])
        .parse()
        .unwrap();
    assert!((1..=61_000).contains(&ttl), "ttl {ttl}");
}

/// A primary with an evicting policy is refused, named with its policy: by a new connection
/// (every call fails, none passes) and by the readiness check of a connection made before the
/// change (which then drops it, so the calls fail closed too). Fixed, it is used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_primary_is_refused_with_its_policy_named() {
    let cluster = RedisCluster::start(3);
    let early = cache(&cluster);
    assert_eq!(
        early.check_and_record("before", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    let evicting = &cluster.nodes[1];
    let evicting_addr = evicting.addr().to_string();
    for policy in ["allkeys-lru", "volatile-ttl"] {
        assert_eq!(
            evicting.cli(&["CONFIG", "SET", "maxmemory-policy", policy]),
            "OK"
        );
        // A new process: refused at connect, on whichever node the nonce would go.
        let late = cache(&cluster);
        for nonce in ["a", "b", "c", "d"] {
            let Err(error) = late.check_and_record(nonce, NOW + 60, NOW).await else {
                panic!("a nonce was accepted on a cluster with an evicting primary ({policy})");
            };
            let text = error.to_string();
            assert!(text.contains(policy), "{text}");
            assert!(text.contains(&evicting_addr), "names the primary: {text}");
            assert!(text.contains("noeviction"), "says the fix: {text}");
        }
        assert!(!late.ready().await, "not ready with {policy}");
        // The connection made before the change: readiness finds it and drops the connection.
        assert!(
            !early.ready().await,
            "readiness rereads the policy ({policy})"
        );
        let Err(error) = early.check_and_record("after", NOW + 60, NOW).await else {
            panic!("the early connection still wrote after readiness found {policy}");
        };
        assert!(error.to_string().contains(policy), "{error}");
    }
    assert_eq!(
        evicting.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
        "OK"
    );
    // Whichever primary it is: each one is checked.
    for node in &cluster.nodes {
        assert_eq!(
            node.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-random"]),
            "OK"
        );
        let Err(error) = cache(&cluster).check_and_record("x", NOW + 60, NOW).await else {
            panic!("accepted with {} evicting", node.addr());
        };
        assert!(
            error.to_string().contains(&node.addr().to_string()),
            "names {}: {error}",
            node.addr()
        );
        assert_eq!(
            node.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]),
            "OK"
        );
    }
    assert!(early.ready().await, "usable again once fixed");
    assert_eq!(
        early.check_and_record("after", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    assert_eq!(
        early.check_and_record("before", NOW + 60, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
}

/// A stopped primary: every call for a nonce it serves fails (never `Fresh`, never a pass)
/// within `op_timeout` (+ `connect_timeout` for a new connection), readiness is false, and a
/// new process cannot connect at all. Restarted, the same connection works again by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_primary_fails_its_calls_closed_within_the_deadline() {
    let mut cluster = RedisCluster::start(3);
    let running = cache(&cluster);
    // Nonces served by node 2, one recorded before the stop.
    let on_node_2 = nonces_on(&cluster, 2, "s", 5);
    assert_eq!(
        running.check_and_record(&on_node_2[0], NOW + 60, NOW).await,
        Ok(ReplayOutcome::Fresh)
    );
    cluster.nodes[2].stop();
    // At once (before the others mark it failed: `cluster-node-timeout` 1 s, so CLUSTER INFO
    // may still say ok), a new connection is refused: the check of node 2 reaches another node
    // (the crate sends a command for a primary it cannot reach elsewhere), which CLUSTER MYID
    // tells apart.
    let fresh = cache(&cluster);
    assert!(!fresh.ready().await, "ready with a primary just stopped");
    let bound = options().op_timeout + options().connect_timeout + Duration::from_millis(500);
    assert_fails_closed(&running, &on_node_2, bound, bound, "down").await;
    // A new process: refused at connect (every primary must answer its check).
    let started = Instant::now();
    let Err(error) = fresh.check_and_record("new-process", NOW + 60, NOW).await else {
        panic!("a new connection accepted a nonce with a primary down");
    };
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    assert!(error.to_string().contains("redis"), "{error}");

    // Back (its nodes.conf kept: it rejoins), the running connection recovers by itself; the
    // nonce recorded before is gone with the node's memory (no persistence), so it is not
    // asserted on.
    cluster.nodes[2].restart();
    cluster.wait_ok("after the restart");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if running.check_and_record(&on_node_2[1], NOW + 60, NOW).await == Ok(ReplayOutcome::Fresh)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster connection did not recover"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        running.check_and_record(&on_node_2[1], NOW + 60, NOW).await,
        Ok(ReplayOutcome::Replayed)
    );
    assert!(running.ready().await);
}

/// A failover (`CLUSTER FAILOVER` on a replica): the same connection follows the slots to
/// the promoted replica by itself (`MOVED`), nonces recorded before are still replays there,
/// and readiness checks the new primary's eviction policy too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_follow_a_failover_to_the_promoted_replica() {
    let cluster = RedisCluster::start_with_replicas(3);
    let running = cache(&cluster);
    assert!(running.ready().await);
    let on_node_0 = nonces_on(&cluster, 0, "f", 4);
    for nonce in &on_node_0[..2] {
        assert_eq!(
            running.check_and_record(nonce, NOW + 60, NOW).await,
            Ok(ReplayOutcome::Fresh)
        );
    }
    let replica = cluster.replica_of(0).expect("node 0 has a replica");
    // A manual failover waits for the replica to catch up: what node 0 had, it has.
    assert_eq!(cluster.nodes[replica].cli(&["CLUSTER", "FAILOVER"]), "OK");
    wait_until("the replica promoted", Duration::from_secs(20), || {
        cluster.nodes[replica].cli(&["ROLE"]).starts_with("master")
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match running.check_and_record(&on_node_0[2], NOW + 60, NOW).await {
            Ok(ReplayOutcome::Fresh) => break,
            Ok(ReplayOutcome::Replayed) => panic!("a first use seen as a replay"),
            Err(error) => {
                assert!(Instant::now() < deadline, "no recovery: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    for nonce in &on_node_0[..3] {
        assert_eq!(
            running.check_and_record(nonce, NOW + 60, NOW).await,
            Ok(ReplayOutcome::Replayed),
            "{nonce} after the failover"
        );
    }
    assert_eq!(
        cluster.node_of(&format!("cluster:nonce:{}", on_node_0[0])),
        replica,
        "the promoted replica serves the slots"
    );
    // The crate's slot map may still name the demoted node for these slots (the MOVED above
    // had it refresh the map from a node that had not yet heard of the failover), mended only
    // by the next MOVED: readiness asks each primary where `CLUSTER SLOTS` says it is, so it
    // does not wait for traffic (which a balancer sends no process that is not ready). Before,
    // readiness could stay false here for the whole 20 s (a CI run of 2026-12-04).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !running.ready().await {
        assert!(Instant::now() < deadline, "not ready after the failover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The new primary is checked like the others.
    assert_eq!(
        cluster.nodes[replica].cli(&["CONFIG", "SET", "maxmemory-policy", "volatile-lru"]),
        "OK"
    );
    // Never ready again while it evicts. A check may fail for another reason first on a loaded
    // machine (past `ping_timeout`, with three primaries to ask), and that leaves the
    // connection as it is (between two readiness checks an open connection is not checked
    // again, as documented); the check that reads the new primary's policy drops it, and from
    // then on every call fails closed, naming the policy. A CI run of the whole suite
    // (2026-12-05) had the first call after one not-ready check accepted.
    let fresh = nonces_on(&cluster, replica, "e", 60);
    let mut fresh = fresh.iter();
    let deadline = Instant::now() + Duration::from_secs(20);
    let error = loop {
        assert!(
            !running.ready().await,
            "an evicting promoted replica is refused"
        );
        let nonce = fresh.next().expect("a fresh nonce");
        match running.check_and_record(nonce, NOW + 60, NOW).await {
            Err(error) if error.to_string().contains("volatile-lru") => break error,
            other => assert!(
                Instant::now() < deadline,
                "the evicting primary never refused: last call {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(error.to_string().contains("volatile-lru"), "{error}");
    // Closed from then on, not once.
    let Err(error) = running.check_and_record(&on_node_0[3], NOW + 60, NOW).await else {
        panic!("accepted with the new primary evicting");
    };
    assert!(error.to_string().contains("volatile-lru"), "{error}");
}

/// A hung primary (SIGSTOP: connections open, nothing answered): its calls fail within
/// `op_timeout`, none hangs and none passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_primary_fails_its_calls_within_the_call_deadline() {
    let cluster = RedisCluster::start(3);
    let running = cache(&cluster);
    assert!(running.ready().await);
    let on_node_0 = nonces_on(&cluster, 0, "h", 3);
    cluster.nodes[0].pause();
    let call_bound = options().op_timeout + Duration::from_millis(1000);
    let ready_bound = options().ping_timeout + Duration::from_millis(1000);
    assert_fails_closed(&running, &on_node_0, call_bound, ready_bound, "hung").await;
    cluster.nodes[0].resume();
}

/// TLS to every node (`rediss://`, `tls-cluster yes`), checked against a private CA: the
/// replay cache works and spreads; with the public web roots instead, nothing passes and the
/// error names the certificate (each seed node asked for the reason); a plain-TCP client on
/// the TLS ports fails closed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_is_used_with_a_private_ca() {
    let (cluster, tls_ports, files) = RedisCluster::start_tls(3);
    let urls: Vec<String> = tls_ports
        .iter()
        .map(|port| format!("rediss://127.0.0.1:{port}"))
        .collect();
    let connection =
        RedisConnection::cluster_with_tls_root_cert(&urls, options(), files.ca_pem.as_bytes())
            .unwrap();
    assert!(connection.endpoint().starts_with("rediss+cluster://"));
    let tls = RedisReplayCache::new(connection, "tls:nonce:");
    assert!(tls.ready().await, "ready over TLS");
    for i in 0..30 {
        let nonce = format!("t-{i}");
        assert_eq!(
            tls.check_and_record(&nonce, NOW + 60, NOW).await,
            Ok(ReplayOutcome::Fresh)
        );
        assert_eq!(
            tls.check_and_record(&nonce, NOW + 60, NOW).await,
            Ok(ReplayOutcome::Replayed)
        );
    }
    let per_node = cluster.keys_per_node("tls:nonce:*");
    assert!(per_node.iter().all(|&keys| keys > 0), "{per_node:?}");

    let public = RedisReplayCache::new(
        RedisConnection::cluster(&urls, options()).unwrap(),
        "tls:nonce:",
    );
    let Err(error) = public.check_and_record("x", NOW + 60, NOW).await else {
        panic!("accepted with an untrusted certificate");
    };
    let text = error.to_string();
    assert!(text.contains("no seed node could be used"), "{text}");
    assert!(
        text.contains("certificate"),
        "names the certificate: {text}"
    );
    assert!(!public.ready().await);
    let plain_urls: Vec<String> = tls_ports
        .iter()
        .map(|port| format!("redis://127.0.0.1:{port}"))
        .collect();
    let plain = RedisReplayCache::new(
        RedisConnection::cluster(&plain_urls, options()).unwrap(),
        "tls:nonce:",
    );
    let started = Instant::now();
    assert!(
        plain.check_and_record("y", NOW + 60, NOW).await.is_err(),
        "plain TCP to the TLS ports"
    );
    assert!(started.elapsed() < options().connect_timeout + Duration::from_millis(500));

    // The proxy's keys for it: `check-config --online` connects as `run` would (hostless
    // rediss:// URL, redis_ca_file) and passes; with another CA's file it fails on the
    // certificate.
    let api = start_api(cluster_connection(&cluster)).await;
    let files_dir = FleetFiles::new();
    let nodes: Vec<String> = tls_ports
        .iter()
        .map(|port| format!("\"127.0.0.1:{port}\""))
        .collect();
    let other_ca = support_redis::TlsFiles::issue(&["127.0.0.1"]);
    for (name, ca_file, passes) in [
        ("right-ca", &files.ca_file, true),
        ("other-ca", &other_ca.ca_file, false),
    ] {
        let session = format!(
            "redis_url = \"rediss://\"\nredis_cluster_nodes = [{}]\n\
             redis_key_prefix = \"{{tls}}:\"\nredis_ca_file = {:?}",
            nodes.join(", "),
            ca_file.display().to_string()
        );
        let config = files_dir.proxy_config(name, &session, api.addr);
        let output = Command::new(BIN)
            .args(["check-config", "--online", "--config"])
            .arg(&config.path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = output_text(&output);
        assert_eq!(output.status.success(), passes, "{name}: {text}");
        if passes {
            assert!(text.contains("every primary answering"), "{name}: {text}");
        } else {
            assert!(text.contains("UnknownIssuer"), "{name}: {text}");
        }
    }
}

/// The least-privilege ACL user of docs/DEPLOYMENT.md, with its cluster additions, is
/// enough: the connection check, readiness, the replay cache and the session store's scripts
/// all work with it on every node; the same user without `+cluster|myid` is refused (the check
/// cannot tell the primaries apart), so the list is not longer than needed there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_acl_user_is_enough_on_a_cluster() {
    use countersign::proxy::session::{SessionStore as _, SessionTimeouts};
    use countersign::proxy::session_redis::RedisSessionStore;
    const RULES: &str = "on >acl-pw ~{cs}:* ~cluster:nonce:* +get +set +del +incr +expire \
        +pttl +ttl +zadd +zrem +zcard +zremrangebyscore +sadd +srem +smembers +exists +decr \
        +eval +ping +multi +exec +role +info +cluster|info +cluster|slots +cluster|myid +asking";
    let without_myid = RULES.replace(" +cluster|myid", "");
    let mut args = vec!["--user", "countersign"];
    args.extend(RULES.split_whitespace());
    args.extend(["--user", "partial"]);
    args.extend(without_myid.split_whitespace());
    let cluster = RedisCluster::start_with(3, &args);
    let urls = |user: &str| -> Vec<String> {
        cluster
            .node_addrs()
            .iter()
            .map(|addr| format!("redis://{user}:acl-pw@{addr}"))
            .collect()
    };
    let connection = RedisConnection::cluster(&urls("countersign"), options()).unwrap();
    let replay = RedisReplayCache::new(connection.clone(), "cluster:nonce:");
    assert!(replay.ready().await, "ready with the documented ACL");
    for i in 0..10 {
        assert_eq!(
            replay
                .check_and_record(&format!("acl-{i}"), NOW + 60, NOW)
                .await,
            Ok(ReplayOutcome::Fresh)
        );
    }
    let summary = connection.eviction_policy_summary().await.unwrap();
    assert!(
        summary.contains("noeviction on all 3 primaries"),
        "{summary}"
    );
    let store = RedisSessionStore::new(
        connection,
        "{cs}:",
        SessionTimeouts {
            idle: Duration::from_secs(600),
            absolute: Duration::from_secs(3600),
        },
        100,
    );
    let alice = countersign::Identity::new("alice", ["admin"]);
    let (id, _) = store.create(&alice, NOW).await.unwrap();
    assert!(store.get(&id, NOW + 10, true).await.unwrap().is_some());
    assert_eq!(store.count().await.unwrap(), 1);
    assert_eq!(store.delete_user("alice").await.unwrap(), 1);
    assert!(store.get(&id, NOW + 11, false).await.unwrap().is_none());

    let partial = RedisReplayCache::new(
        RedisConnection::cluster(&urls("partial"), options()).unwrap(),
        "cluster:nonce:",
    );
    let Err(error) = partial.check_and_record("p", NOW + 60, NOW).await else {
        panic!("used without CLUSTER MYID");
    };
    assert!(error.to_string().contains("CLUSTER MYID failed"), "{error}");
    assert!(error.to_string().contains("cluster|myid"), "{error}");
}

/// Seed-node URLs that cannot be used are refused when the connection is made, without
/// quoting a password.
#[test]
fn unusable_cluster_node_urls_are_refused() {
    let empty: [&str; 0] = [];
    for (nodes, needle) in [
        (&empty[..], "at least one cluster node"),
        (&["redis://127.0.0.1:7000/2"][..], "only database 0"),
        (&["http://127.0.0.1:7000"][..], "must start with redis://"),
        (&["redis://127.0.0.1:"][..], "empty port"),
        (
            &[
                "redis://:S3cret@127.0.0.1:7000",
                "redis://:other@127.0.0.1:7001",
            ][..],
            "unusable cluster node URLs",
        ),
        (
            &["rediss://127.0.0.1:7000", "redis://127.0.0.1:7001"][..],
            "nodes mixed",
        ),
    ] {
        let Err(error) = RedisConnection::cluster(nodes, options()) else {
            panic!("{nodes:?} accepted");
        };
        let text = error.to_string();
        assert!(text.contains(needle), "{nodes:?}: {text}");
        assert!(
            !text.contains("S3cret") && !text.contains("other"),
            "{text}"
        );
    }
    let Err(error) =
        RedisConnection::cluster_with_tls_root_cert(&["redis://127.0.0.1:7000"], options(), b"x")
    else {
        panic!("a CA for plain TCP accepted");
    };
    assert!(error.to_string().contains("rediss://"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// The proxy
// ---------------------------------------------------------------------------------------------

/// `[session]` lines for the cluster: its nodes, the hash-tagged prefix.
fn cluster_session(cluster: &RedisCluster) -> String {
    let nodes: Vec<String> = cluster
        .node_addrs()
        .iter()
        .map(|addr| format!("{addr:?}"))
        .collect();
    format!(
        "redis_cluster_nodes = [{}]\nredis_key_prefix = \"{{fleet}}:\"",
        nodes.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// The proxy: tests
// ---------------------------------------------------------------------------------------------

/// Two proxies on one cluster: log in on A; B sees the session and forwards a signed request
/// the API (its replay cache on the cluster too) verifies as alice; log out on B ends it on A.
/// Every key of the stores is on one node (the hash tag), the API's nonces are not tagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_sessions_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    let api = start_api(cluster_connection(&cluster)).await;
    let files = FleetFiles::new();
    let session = cluster_session(&cluster);
    let upstream = api.addr.to_string();
    let proxy_a = ProxyProcess::start_ready(&files.proxy_config("a", &session, &upstream)).await;
    let proxy_b = ProxyProcess::start_ready(&files.proxy_config("b", &session, &upstream)).await;
    let logs = proxy_a.logs();
    assert!(logs.contains("redis+cluster://127.0.0.1:"), "{logs}");

    let Browser { cookie, csrf } = login_ok(&proxy_a, "alice", ALICE_PASSWORD).await;
    let (status, _, body) = must(
        Method::GET,
        &proxy_b.url("/auth/session?touch=false"),
        &[("cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for _ in 0..3 {
        let (status, _, body) = must(
            Method::GET,
            &proxy_b.url("/api/whoami"),
            &[("cookie", &cookie)],
            "",
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}\n{}", proxy_b.logs());
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["user"],
            "alice",
            "the API verified alice's identity signed by proxy B"
        );
    }
    // The trade-off: the stores' keys share one slot, so one node; the nonces spread.
    let store_keys = cluster.keys_per_node("{fleet}:*");
    assert_eq!(
        store_keys.iter().filter(|&&keys| keys > 0).count(),
        1,
        "{store_keys:?}"
    );
    assert!(store_keys.iter().sum::<usize>() >= 3, "{store_keys:?}");
    assert_eq!(
        cluster.keys_per_node("fleet:nonce:*").iter().sum::<usize>(),
        3
    );

    let (status, _, body) = must(
        Method::POST,
        &proxy_b.url("/auth/logout"),
        &[
            ("cookie", &cookie),
            ("x-csrf-token", &csrf),
            ("origin", ORIGIN),
        ],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for proxy in [&proxy_a, &proxy_b] {
        let (status, _, body) = must(
            Method::GET,
            &proxy.url("/api/whoami"),
            &[("cookie", &cookie)],
            "",
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(error_code(&body), "unauthenticated");
    }
}

/// The login throttle on the cluster counts across proxies: three wrong passwords spread over
/// two proxies, then even the right one is refused on both; another user is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_throttle_counts_across_proxies_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    let api = start_api(cluster_connection(&cluster)).await;
    let upstream = api.addr.to_string();
    let files = FleetFiles::new();
    let session = cluster_session(&cluster);
    let proxy_a = ProxyProcess::start_ready(&files.proxy_config("a", &session, &upstream)).await;
    let proxy_b = ProxyProcess::start_ready(&files.proxy_config("b", &session, &upstream)).await;
    for proxy in [&proxy_a, &proxy_b, &proxy_a] {
        let (status, _, body) = login(proxy, "alice", "wrong").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
    for proxy in [&proxy_b, &proxy_a] {
        let (status, _, body) = login(proxy, "alice", ALICE_PASSWORD).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
        assert_eq!(error_code(&body), "too_many_attempts");
    }
    login_ok(&proxy_b, "bob", "bob-password").await;
    let throttle_keys = cluster.keys_per_node("{fleet}:throttle:*");
    assert_eq!(
        throttle_keys.iter().filter(|&&keys| keys > 0).count(),
        1,
        "{throttle_keys:?}"
    );
}

/// The primary holding the stores' slot stopped: logins and session lookups answer 503
/// `session_store_unavailable` (never a session, never a login without the throttle) and
/// `/readyz` is not ready; restarted, the same proxy recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_fails_closed_while_the_sessions_primary_is_down() {
    let mut cluster = RedisCluster::start(3);
    let api = start_api(cluster_connection(&cluster)).await;
    let files = FleetFiles::new();
    let session = cluster_session(&cluster);
    let proxy = ProxyProcess::start_ready(&files.proxy_config("a", &session, api.addr)).await;
    let cookie = login_ok(&proxy, "alice", ALICE_PASSWORD).await.cookie;
    let holder = cluster.node_of("{fleet}:sessions");
    cluster.nodes[holder].stop();
    let (status, _, body) = login(&proxy, "bob", "bob-password").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "session_store_unavailable");
    let (status, _, body) = must(
        Method::GET,
        &proxy.url("/api/whoami"),
        &[("cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(error_code(&body), "session_store_unavailable");
    // Readiness is probed in the background (every 2 s): it turns within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    while must(Method::GET, &proxy.admin_url("/readyz"), &[], "")
        .await
        .0
        != StatusCode::SERVICE_UNAVAILABLE
    {
        assert!(
            Instant::now() < deadline,
            "still ready with the primary down"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    cluster.nodes[holder].restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, _) = login(&proxy, "bob", "bob-password").await;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no recovery: {status}\n{}",
            proxy.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while must(Method::GET, &proxy.admin_url("/readyz"), &[], "")
        .await
        .0
        != StatusCode::OK
    {
        assert!(Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The cluster-mode config errors: `check-config` (and, for the hash tag, `run`) exits
/// non-zero naming the file and key, never quoting a password; a good cluster config passes.
#[test]
fn cluster_config_errors_name_the_key() {
    let files = FleetFiles::new();
    let nodes = "redis_cluster_nodes = [\"127.0.0.1:7000\", \"127.0.0.1:7001\"]";
    let tagged = "redis_key_prefix = \"{cs}:\"";
    let sentinels = "redis_sentinels = [\"127.0.0.1:26379\"]\nredis_sentinel_master = \"mymaster\"";
    for (name, session, key, needle) in [
        (
            "untagged",
            nodes.to_owned(),
            "session.redis_key_prefix",
            "hash tag",
        ),
        (
            "empty-tag",
            format!("{nodes}\nredis_key_prefix = \"{{}}:\""),
            "session.redis_key_prefix",
            "hash tag",
        ),
        (
            "sentinels",
            format!("{nodes}\n{tagged}\n{sentinels}"),
            "session.redis_cluster_nodes",
            "session.redis_sentinels",
        ),
        (
            "host",
            format!("{nodes}\n{tagged}\nredis_url = \"redis://:S3cret@10.0.0.1:6379\""),
            "session.redis_url",
            "names a host",
        ),
        (
            "database",
            format!("{nodes}\n{tagged}\nredis_url = \"redis://:S3cret@/2\""),
            "session.redis_url",
            "only database 0",
        ),
        (
            "empty",
            format!("redis_cluster_nodes = []\n{tagged}"),
            "session.redis_cluster_nodes",
            "at least one",
        ),
        (
            "url-entry",
            format!("redis_cluster_nodes = [\"redis://:S3cret@h:7000\"]\n{tagged}"),
            "session.redis_cluster_nodes",
            "not a URL",
        ),
        (
            "twice",
            format!("redis_cluster_nodes = [\"h:7000\", \"h:7000\"]\n{tagged}"),
            "session.redis_cluster_nodes",
            "twice",
        ),
    ] {
        let config = files.proxy_config(name, &session, "127.0.0.1:3000");
        let output = check_config(&config.path);
        let text = output_text(&output);
        assert!(!output.status.success(), "{name}: accepted: {text}");
        let path = config.path.display().to_string();
        assert!(
            text.contains(&format!("{path}: {key}: ")),
            "{name}: names the file and {key}: {text}"
        );
        assert!(text.contains(needle), "{name}: {needle:?} in {text}");
        assert!(
            !text.contains("S3cret"),
            "{name}: quotes the password: {text}"
        );
    }
    // `run` refuses the untagged prefix the same way, before listening.
    let config = files.proxy_config("run-untagged", nodes, "127.0.0.1:3000");
    let output = Command::new(BIN)
        .args(["run", "--config", config.path.to_str().unwrap()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = output_text(&output);
    assert!(!output.status.success(), "run accepted: {text}");
    assert!(text.contains("session.redis_key_prefix"), "{text}");
    assert!(text.contains("hash tag"), "{text}");
    // A good cluster config (credentials in a hostless URL) passes check-config.
    let config = files.proxy_config(
        "good",
        &format!("{nodes}\n{tagged}\nredis_url = \"redis://:S3cret@\""),
        "127.0.0.1:3000",
    );
    let output = check_config(&config.path);
    assert!(output.status.success(), "{}", output_text(&output));
}

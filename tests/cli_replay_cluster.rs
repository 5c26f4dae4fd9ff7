//! `countersign verify` and `countersign demo-api` with the replay cache on a Redis Cluster
//! (`--replay-redis-cluster-node HOST:PORT`, repeated or comma-separated; credentials and TLS
//! from a host-less `--replay-redis`), on a real 3-node cluster (tests/support_redis,
//! `RedisCluster`: `redis-server --cluster-enabled yes` joined with `redis-cli --cluster
//! create`); behind Redis Sentinel (`--replay-redis-sentinel`, `-master`, `-password`, `-tls`);
//! and with a private CA (`--replay-redis-ca`) for one TLS server, a TLS cluster and TLS
//! sentinels.
//!
//! Proves: separate `verify` processes share the nonce history in the cluster (valid once,
//! then `replayed`, exit 1); the nonces land on the node serving their slot, each node used;
//! the credentials of `--replay-redis` reach every node; two `demo-api` instances on the
//! cluster answer a signed request once and 401 `replayed` after; the same through a
//! password-protected sentinel; a private CA is needed and used; and the usage errors of the
//! new options exit 2 with a message naming the option and the problem, never the password.
//! Run: `cargo test --all-features --test cli_replay_cluster`.
#![cfg(feature = "proxy")]

mod support_cli;
mod support_redis;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support_cli::{
    exit_within, http_exchange, run, run_countersign, signed_whoami, DemoApi, Run, BIN,
};
use support_redis::{RedisCluster, RedisServer, SentinelServer, TlsFiles, SENTINEL_MASTER};

/// 32 bytes 0x00..0x1f, base64.
const SECRET: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const CREATED: u64 = 1_700_000_000;
/// The key prefix of `RedisReplayCache::open` (the APIs' default), which the CLI uses too.
const PREFIX: &str = "countersign:nonce:";

const REQUEST: &[u8] = b"POST /orders HTTP/1.1\r\n\
Host: api.example.com\r\n\
Content-Type: application/json\r\n\
Content-Length: 9\r\n\
\r\n\
{\"qty\":3}";

/// A temporary directory removed when dropped (also when the test fails).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A keyring file in a directory of its own (tests run in parallel).
fn keyring() -> (TempDir, PathBuf) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir: PathBuf = std::env::temp_dir().join(format!(
        "countersign-cli-replay-cluster-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keys.toml");
    std::fs::write(
        &path,
        format!("active = \"k1\"\n[[keys]]\nid = \"k1\"\nsecret = \"{SECRET}\"\n"),
    )
    .unwrap();
    (TempDir(dir), path)
}

/// `REQUEST` signed by `countersign sign` with `nonce`, at `CREATED` (`None`: now).
fn signed(keyring: &Path, nonce: &str, created: Option<u64>) -> Vec<u8> {
    let keyring = keyring.display().to_string();
    let mut args = vec![
        "sign".to_owned(),
        "--keyring".to_owned(),
        keyring,
        "--nonce".to_owned(),
        nonce.to_owned(),
        "--user".to_owned(),
        "alice".to_owned(),
    ];
    if let Some(created) = created {
        args.extend(["--created".to_owned(), created.to_string()]);
    }
    let out = run_countersign(&args, REQUEST);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `countersign verify` of `request` at `CREATED + 2` with the replay cache options `replay`.
fn verify(keyring: &Path, request: &[u8], replay: &[&str]) -> Run {
    let keyring = keyring.display().to_string();
    let now = (CREATED + 2).to_string();
    let mut args = vec!["verify", "--keyring", &keyring, "--now", &now];
    args.extend_from_slice(replay);
    run(&args, request)
}

fn json(run: &Run) -> serde_json::Value {
    serde_json::from_str(run.stdout.trim_end())
        .unwrap_or_else(|e| panic!("not one JSON line ({e}): {:?} {}", run.stdout, run.stderr))
}

/// `--replay-redis-cluster-node ADDR` once per node.
fn node_flags(cluster: &RedisCluster) -> Vec<String> {
    cluster
        .node_addrs()
        .into_iter()
        .flat_map(|addr| ["--replay-redis-cluster-node".to_owned(), addr])
        .collect()
}

/// A nonce (valid for `sign`: at least 128 bits of base64url) whose replay key hashes to a
/// slot that node `node` serves.
fn nonce_on_node(cluster: &RedisCluster, node: usize, tag: &str) -> String {
    (0..500)
        .map(|i| format!("cluster-{tag}-nonce-{i:06}"))
        .find(|nonce| cluster.node_of(&format!("{PREFIX}{nonce}")) == node)
        .unwrap_or_else(|| panic!("no nonce found for node {node}"))
}

/// Two `verify` processes: the first accepts the request and records its nonce in the
/// cluster, the second answers `replayed` (exit 1, one line of JSON). One nonce per node, so
/// every primary takes part: each key is on the node that serves its slot, with its time to
/// live, and on no other. Both spellings of the node list (the option repeated, one comma
/// list) name the same cluster.
#[test]
fn verify_on_a_cluster_accepts_a_request_once_across_processes() {
    let cluster = RedisCluster::start(3);
    let (_dir, keyring) = keyring();
    let repeated = node_flags(&cluster);
    let repeated: Vec<&str> = repeated.iter().map(String::as_str).collect();
    let list = cluster.node_addrs().join(",");
    let comma = ["--replay-redis-cluster-node", list.as_str()];
    for node in 0..cluster.nodes.len() {
        let nonce = nonce_on_node(&cluster, node, "verify");
        let request = signed(&keyring, &nonce, Some(CREATED));
        let first = verify(&keyring, &request, &repeated);
        assert_eq!(first.code, 0, "{nonce}: {} {}", first.stdout, first.stderr);
        assert_eq!(json(&first)["valid"], true);
        assert_eq!(json(&first)["user"], "alice");

        let second = verify(&keyring, &request, &comma);
        assert_eq!(
            second.code, 1,
            "{nonce}: {} {}",
            second.stdout, second.stderr
        );
        assert_eq!(
            json(&second),
            serde_json::json!({"valid": false, "reason": "replayed"}),
            "{}",
            second.stderr
        );
        assert!(second.stderr.contains("replayed"), "{}", second.stderr);

        let key = format!("{PREFIX}{nonce}");
        let ttl: i64 = cluster.nodes[node].cli(&["PTTL", &key]).parse().unwrap();
        // `created + window (10 s)` after `now = created + 2`, plus the skew.
        assert!((1..=60_000).contains(&ttl), "{key}: ttl {ttl}");
    }
    let per_node = cluster.keys_per_node(&format!("{PREFIX}*"));
    assert_eq!(per_node, vec![1; cluster.nodes.len()], "one nonce per node");
}

/// The credentials of a host-less `--replay-redis` reach every node: with them each node's
/// nonce is recorded (valid, then replayed); without them, or with a wrong password, the
/// answer is `replay_cache_unavailable` (exit 1, fail closed), the cause on stderr, never
/// the password.
#[test]
fn verify_on_a_cluster_uses_the_credentials_of_a_host_less_replay_redis() {
    let cluster = RedisCluster::start(3);
    // Nonces per node found before the password is set (`node_of` asks without one).
    let nonces: Vec<String> = (0..cluster.nodes.len())
        .map(|node| nonce_on_node(&cluster, node, "auth"))
        .collect();
    for node in &cluster.nodes {
        assert_eq!(
            node.cli(&["CONFIG", "SET", "requirepass", "cluster-s3cret"]),
            "OK"
        );
    }
    let (_dir, keyring) = keyring();
    let nodes = cluster.node_addrs().join(",");
    for nonce in &nonces {
        let request = signed(&keyring, nonce, Some(CREATED));
        for (url, what) in [
            (None, "no credentials"),
            (Some("redis://:WRONG-s3cret@"), "a wrong password"),
        ] {
            let mut replay = vec!["--replay-redis-cluster-node", nodes.as_str()];
            if let Some(url) = url {
                replay.extend(["--replay-redis", url]);
            }
            let out = verify(&keyring, &request, &replay);
            assert_eq!(out.code, 1, "{what}: {} {}", out.stdout, out.stderr);
            assert_eq!(json(&out)["reason"], "replay_cache_unavailable", "{what}");
            assert!(!out.stderr.contains("s3cret"), "{what}: {}", out.stderr);
        }
        let replay = [
            "--replay-redis",
            "redis://:cluster-s3cret@",
            "--replay-redis-cluster-node",
            nodes.as_str(),
        ];
        let first = verify(&keyring, &request, &replay);
        assert_eq!(first.code, 0, "{nonce}: {} {}", first.stdout, first.stderr);
        let second = verify(&keyring, &request, &replay);
        assert_eq!(second.code, 1, "{nonce}: {}", second.stderr);
        assert_eq!(json(&second)["reason"], "replayed");
    }
    let per_node: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|node| {
            node.cli(&[
                "-a",
                "cluster-s3cret",
                "--no-auth-warning",
                "KEYS",
                &format!("{PREFIX}*"),
            ])
            .lines()
            .filter(|line| !line.trim().is_empty())
            .count()
        })
        .collect();
    assert_eq!(per_node, vec![1; cluster.nodes.len()], "one nonce per node");
}

/// Two demo API instances on the cluster (one given the nodes one by one, the other as a comma
/// list): a signed request answered by one is 401 `replayed` at the same instance and at the
/// other, for a nonce on each node; the keys are in the cluster, on the node of their slot.
#[test]
fn demo_api_on_a_cluster_answers_a_request_once_then_replayed() {
    let cluster = RedisCluster::start(3);
    let (_dir, keyring) = keyring();
    let api_a = DemoApi::start(&keyring, &node_flags(&cluster));
    let api_b = DemoApi::start(
        &keyring,
        &[
            "--replay-redis-cluster-node".to_owned(),
            cluster.node_addrs().join(","),
        ],
    );
    for node in 0..cluster.nodes.len() {
        let nonce = nonce_on_node(&cluster, node, "demo-api");
        let request = signed_whoami(&keyring, &["--nonce", &nonce]);
        let (status, body) = http_exchange(api_a.addr, &request);
        assert_eq!(status, 200, "{nonce}: {body}");
        assert!(body.contains("alice"), "{body}");
        for (api, which) in [
            (&api_a, "the same instance"),
            (&api_b, "the other instance"),
        ] {
            let (status, body) = http_exchange(api.addr, &request);
            assert_eq!(status, 401, "{nonce} at {which}: {body}");
            assert!(body.contains("\"replayed\""), "{nonce} at {which}: {body}");
        }
        let key = format!("{PREFIX}{nonce}");
        assert_eq!(cluster.nodes[node].cli(&["EXISTS", &key]), "1", "{key}");
    }
    let per_node = cluster.keys_per_node(&format!("{PREFIX}*"));
    assert_eq!(per_node, vec![1; cluster.nodes.len()], "one nonce per node");
}

/// Each usage error of the cluster options, for `verify` and for `demo-api`: exit 2, one
/// message naming the option and the problem, no password, nothing on stdout (`verify`), no
/// listener (`demo-api`). No Redis is needed: the options are checked before any connection.
#[test]
fn cluster_option_errors_are_usage_errors_naming_the_option() {
    let (_dir, keyring) = keyring();
    let request = signed(&keyring, "cli-cluster-usage-nonce-01", Some(CREATED));
    let node = "--replay-redis-cluster-node";
    let cases: &[(&[&str], &str, &[&str])] = &[
        (
            &[
                "--replay-redis",
                "redis://:pw-s3cret@10.0.0.9:6379",
                node,
                "10.0.0.1:6379",
            ],
            "--replay-redis:",
            &["names a host (\"10.0.0.9\")", "leave the host out"],
        ),
        (
            &[
                "--replay-redis",
                "rediss://:pw-s3cret@/2",
                node,
                "10.0.0.1:6379",
            ],
            "--replay-redis:",
            &["only database 0"],
        ),
        (
            // The `@` after the password forgotten: refused without quoting it.
            &[
                "--replay-redis",
                "redis://:pw-s3cret",
                node,
                "10.0.0.1:6379",
            ],
            "--replay-redis:",
            &["no host may be given", "\"@\""],
        ),
        (
            &[
                "--replay-redis",
                "http://:pw-s3cret@",
                node,
                "10.0.0.1:6379",
            ],
            "--replay-redis:",
            &["redis:// or rediss://"],
        ),
        (
            &[
                "--replay-redis",
                "redis://:pw-s3cret@/?x=1",
                node,
                "10.0.0.1:6379",
            ],
            "--replay-redis:",
            &["no query or fragment"],
        ),
        (
            &[node, "redis://:pw-s3cret@10.0.0.1:6379"],
            "--replay-redis-cluster-node:",
            &["node 1 of 1 is a URL", "expected host:port"],
        ),
        (
            &[node, "10.0.0.1:6379,,10.0.0.2:6379"],
            "--replay-redis-cluster-node:",
            &["node 2 of 3 is empty"],
        ),
        (
            &[node, ""],
            "--replay-redis-cluster-node:",
            &["node 1 of 1 is empty"],
        ),
        (
            &[
                node,
                "10.0.0.1:6379",
                node,
                "10.0.0.2:6379",
                node,
                "10.0.0.1:6379",
            ],
            "--replay-redis-cluster-node:",
            &["node 3 of 3 (\"10.0.0.1:6379\") is node 1 listed again"],
        ),
        (
            // The default port written or not: the same node.
            &[node, "redis-a,redis-a:6379"],
            "--replay-redis-cluster-node:",
            &["node 2 of 2 (\"redis-a:6379\") is node 1 listed again"],
        ),
        (
            &[node, ":6379"],
            "--replay-redis-cluster-node:",
            &["is not host:port"],
        ),
        (
            &[node, "10.0.0.1:0"],
            "--replay-redis-cluster-node:",
            &["port is not a number from 1 to 65535"],
        ),
        (
            // A password where the port goes: refused, not shown.
            &[node, "10.0.0.1:pw-s3cret"],
            "--replay-redis-cluster-node:",
            &["port is not a number from 1 to 65535"],
        ),
        (
            // The same, given twice: the repeat is named, the password still not shown (it
            // was, before the port's own check could refuse it).
            &[node, "redis-a:pw-s3cret,redis-a:pw-s3cret"],
            "--replay-redis-cluster-node:",
            &["node 2 of 2 (\"redis-a:[redacted]\") is node 1 listed again"],
        ),
        (
            &[
                "--replay-redis-sentinel",
                "10.0.0.1:pw-s3cret,10.0.0.1:pw-s3cret",
                "--replay-redis-sentinel-master",
                "mymaster",
            ],
            "--replay-redis-sentinel:",
            &["is sentinel 1 listed again"],
        ),
        (
            &[
                "--replay-redis",
                "redis://:pw-s3cret@10.0.0.9/1",
                "--replay-redis-sentinel",
                "10.0.0.1:26379",
                "--replay-redis-sentinel-master",
                "mymaster",
            ],
            "--replay-redis:",
            &["names a host (\"10.0.0.9\")", "--replay-redis-sentinel"],
        ),
        (
            &[
                "--replay-redis-sentinel",
                "10.0.0.1,10.0.0.1:26379",
                "--replay-redis-sentinel-master",
                "mymaster",
            ],
            "--replay-redis-sentinel:",
            &["sentinel 2 of 2 (\"10.0.0.1:26379\") is sentinel 1 listed again"],
        ),
        (
            &[
                "--replay-redis-sentinel",
                "redis://:pw-s3cret@10.0.0.1:26379",
                "--replay-redis-sentinel-master",
                "mymaster",
            ],
            "--replay-redis-sentinel:",
            &["sentinel 1 of 1 is a URL"],
        ),
        (
            &[
                "--replay-redis-sentinel",
                "10.0.0.1:26379",
                "--replay-redis-sentinel-master",
                "my master",
            ],
            "--replay-redis-sentinel-master:",
            &["is not a master name"],
        ),
        (
            &[
                "--replay-redis-sentinel",
                "10.0.0.1:26379",
                "--replay-redis-sentinel-master",
                "mymaster",
                "--replay-redis-sentinel-password",
                "",
            ],
            "--replay-redis-sentinel-password:",
            &["is empty"],
        ),
        (
            &[
                "--replay-redis",
                "redis://10.0.0.1",
                "--replay-redis-ca",
                "/nonexistent/ca.pem",
            ],
            "--replay-redis-ca:",
            &["/nonexistent/ca.pem", "cannot read CA file"],
        ),
        (
            // A device: refused at 1 MiB, not read until memory runs out.
            &[
                "--replay-redis",
                "rediss://10.0.0.1",
                "--replay-redis-ca",
                "/dev/zero",
            ],
            "--replay-redis-ca:",
            &["/dev/zero", "larger than 1048576 bytes"],
        ),
        (
            &["--replay-redis-ca", "/nonexistent/ca.pem"],
            "--replay-redis-ca:",
            &["cannot read"],
        ),
        (
            &[
                "--replay-redis",
                "redis://:pw-s3cret@10.0.0.1",
                "--replay-redis-ca",
                "CA",
            ],
            "--replay-redis-ca:",
            &["only used with TLS", "rediss://"],
        ),
        (
            &[node, "10.0.0.1:6379", "--replay-redis-ca", "CA"],
            "--replay-redis-ca:",
            &["only used with TLS", "rediss://"],
        ),
        (
            &[
                "--replay-redis-sentinel",
                "10.0.0.1:26379",
                "--replay-redis-sentinel-master",
                "mymaster",
                "--replay-redis-ca",
                "CA",
            ],
            "--replay-redis-ca:",
            &["only used with TLS", "--replay-redis-sentinel-tls"],
        ),
        (
            &[
                "--replay-redis",
                "rediss://10.0.0.1",
                "--replay-redis-ca",
                "NOT-PEM",
            ],
            "--replay-redis-ca:",
            &["holds no PEM certificate"],
        ),
        (
            // The cluster form of --replay-redis without the nodes.
            &["--replay-redis", "redis://:pw-s3cret@"],
            "--replay-redis:",
            &["names no host", "--replay-redis-cluster-node"],
        ),
    ];
    // `CA` and `NOT-PEM` stand for files: a real CA certificate, and a file without one.
    let ca_file = keyring.with_file_name("ca.pem");
    std::fs::write(&ca_file, TlsFiles::issue(&["127.0.0.1"]).ca_pem).unwrap();
    let not_pem = keyring.display().to_string();
    let ca_file = ca_file.display().to_string();
    for (args, flag, problems) in cases {
        let args: Vec<&str> = args
            .iter()
            .map(|arg| match *arg {
                "CA" => ca_file.as_str(),
                "NOT-PEM" => not_pem.as_str(),
                arg => arg,
            })
            .collect();
        let args = args.as_slice();
        let out = verify(&keyring, &request, args);
        assert_eq!(
            out.code, 2,
            "verify {args:?}: {} {}",
            out.stdout, out.stderr
        );
        assert_eq!(out.stdout, "", "verify {args:?}");
        assert!(
            out.stderr
                .starts_with(&format!("countersign verify: {flag}")),
            "verify {args:?}: {}",
            out.stderr
        );
        for problem in *problems {
            assert!(
                out.stderr.contains(problem),
                "verify {args:?}: {}",
                out.stderr
            );
        }
        assert!(
            !out.stderr.contains("s3cret"),
            "verify {args:?}: {}",
            out.stderr
        );
        assert_eq!(
            out.stderr.lines().count(),
            1,
            "verify {args:?}: {}",
            out.stderr
        );

        // demo-api: the same message, before it listens.
        let mut child = Command::new(BIN)
            .args(["demo-api", "--listen", "127.0.0.1:0", "--keyring"])
            .arg(&keyring)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let status = exit_within(&mut child, Duration::from_secs(10));
        if status.is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(2),
            "demo-api {args:?}: {stderr}"
        );
        assert!(!stdout.contains("listening"), "demo-api {args:?}: {stdout}");
        assert!(
            stderr.contains(&format!("countersign: {flag}")),
            "demo-api {args:?}: {stderr}"
        );
        for problem in *problems {
            assert!(stderr.contains(problem), "demo-api {args:?}: {stderr}");
        }
        assert!(!stderr.contains("s3cret"), "demo-api {args:?}: {stderr}");
    }
}

/// Options that only go together (or not at all) are refused by the parser: exit 2, the
/// options named.
#[test]
fn sentinel_options_without_their_partners_are_usage_errors() {
    let (_dir, keyring) = keyring();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--replay-redis-sentinel", "10.0.0.1:26379"],
            &["--replay-redis-sentinel-master"],
        ),
        (
            &["--replay-redis-sentinel-master", "mymaster"],
            &["--replay-redis-sentinel "],
        ),
        (
            &["--replay-redis-sentinel-tls"],
            &["--replay-redis-sentinel "],
        ),
        (
            &[
                "--replay-redis-sentinel",
                "10.0.0.1:26379",
                "--replay-redis-sentinel-master",
                "mymaster",
                "--replay-redis-cluster-node",
                "10.0.0.1:6379",
            ],
            &[
                "--replay-redis-sentinel ",
                "--replay-redis-cluster-node",
                "cannot be used with",
            ],
        ),
    ];
    for (args, named) in cases {
        for command in ["verify", "demo-api"] {
            let keyring = keyring.display().to_string();
            let mut all = vec![command, "--keyring", &keyring, "--listen", "127.0.0.1:0"];
            if command == "verify" {
                all.truncate(3);
            }
            all.extend_from_slice(args);
            let out = run(&all, b"");
            assert_eq!(out.code, 2, "{command} {args:?}: {}", out.stderr);
            for name in *named {
                assert!(
                    out.stderr.contains(name),
                    "{command} {args:?}: {}",
                    out.stderr
                );
            }
        }
    }
}

/// Behind Redis Sentinel, with a password on the primary (from the host-less --replay-redis)
/// and on the sentinel (--replay-redis-sentinel-password): `verify` accepts a request once
/// and answers `replayed` in the next process, the nonce on the primary; without the
/// sentinel's password the lookup is refused (`replay_cache_unavailable`, no password in the
/// message); `demo-api` answers a request once, then 401 `replayed`.
#[test]
fn verify_and_demo_api_behind_sentinel() {
    let primary = RedisServer::start_with(&["--requirepass", "primary-s3cret"]);
    let sentinel = SentinelServer::start_with(
        primary.addr(),
        &["sentinel auth-pass mymaster primary-s3cret"],
        Some("sentinel-s3cret"),
    );
    let sentinel_addr = sentinel.addr().to_string();
    let (_dir, keyring) = keyring();
    let base = [
        "--replay-redis",
        "redis://:primary-s3cret@/0",
        "--replay-redis-sentinel",
        sentinel_addr.as_str(),
        "--replay-redis-sentinel-master",
        SENTINEL_MASTER,
    ];
    let with_password = [
        &base[..],
        &["--replay-redis-sentinel-password", "sentinel-s3cret"],
    ]
    .concat();
    let request = signed(&keyring, "cli-sentinel-nonce-000001", Some(CREATED));

    let refused = verify(&keyring, &request, &base);
    assert_eq!(refused.code, 1, "{} {}", refused.stdout, refused.stderr);
    assert_eq!(json(&refused)["reason"], "replay_cache_unavailable");
    assert!(!refused.stderr.contains("s3cret"), "{}", refused.stderr);

    let first = verify(&keyring, &request, &with_password);
    assert_eq!(first.code, 0, "{} {}", first.stdout, first.stderr);
    let second = verify(&keyring, &request, &with_password);
    assert_eq!(second.code, 1, "{}", second.stderr);
    assert_eq!(json(&second)["reason"], "replayed");
    let key = format!("{PREFIX}cli-sentinel-nonce-000001");
    assert_eq!(
        primary.cli(&["-a", "primary-s3cret", "--no-auth-warning", "EXISTS", &key]),
        "1"
    );

    let flags: Vec<String> = with_password.iter().map(|s| s.to_string()).collect();
    let api = DemoApi::start(&keyring, &flags);
    let request = signed_whoami(&keyring, &["--nonce", "cli-sentinel-demo-nonce-01"]);
    let (status, body) = http_exchange(api.addr, &request);
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_exchange(api.addr, &request);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"replayed\""), "{body}");
}

/// `--replay-redis-ca`: one TLS server whose certificate a private CA issued is refused
/// without it (`replay_cache_unavailable`, the unknown issuer named) and used with it (valid,
/// then `replayed`).
#[test]
fn a_private_ca_for_one_server() {
    let (_server, tls_port, ca_pem) = RedisServer::start_tls();
    let (_dir, keyring) = keyring();
    let ca_file = keyring.with_file_name("redis-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let ca_file = ca_file.display().to_string();
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let request = signed(&keyring, "cli-tls-one-nonce-0000001", Some(CREATED));

    let refused = verify(&keyring, &request, &["--replay-redis", &url]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert_eq!(json(&refused)["reason"], "replay_cache_unavailable");
    assert!(
        refused.stderr.contains("UnknownIssuer"),
        "{}",
        refused.stderr
    );

    let with_ca = [
        "--replay-redis",
        url.as_str(),
        "--replay-redis-ca",
        &ca_file,
    ];
    let first = verify(&keyring, &request, &with_ca);
    assert_eq!(first.code, 0, "{} {}", first.stdout, first.stderr);
    let second = verify(&keyring, &request, &with_ca);
    assert_eq!(json(&second)["reason"], "replayed", "{}", second.stderr);
}

/// `--replay-redis-ca` with a TLS cluster (`rediss://` without a host, the nodes' TLS ports):
/// refused without the CA, used with it, a nonce on each node.
#[test]
fn a_private_ca_for_a_tls_cluster() {
    let (cluster, tls_ports, files) = RedisCluster::start_tls(3);
    let (_dir, keyring) = keyring();
    let nodes: Vec<String> = tls_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let nodes = nodes.join(",");
    let ca_file = files.ca_file.display().to_string();
    let plain = [
        "--replay-redis",
        "rediss://",
        "--replay-redis-cluster-node",
        &nodes,
    ];
    let with_ca = [&plain[..], &["--replay-redis-ca", &ca_file]].concat();
    for node in 0..cluster.nodes.len() {
        let nonce = nonce_on_node(&cluster, node, "tls");
        let request = signed(&keyring, &nonce, Some(CREATED));
        let refused = verify(&keyring, &request, &plain);
        assert_eq!(refused.code, 1, "{}", refused.stderr);
        assert_eq!(json(&refused)["reason"], "replay_cache_unavailable");
        let first = verify(&keyring, &request, &with_ca);
        assert_eq!(first.code, 0, "{nonce}: {} {}", first.stdout, first.stderr);
        let second = verify(&keyring, &request, &with_ca);
        assert_eq!(json(&second)["reason"], "replayed", "{}", second.stderr);
    }
    let per_node = cluster.keys_per_node(&format!("{PREFIX}*"));
    assert_eq!(per_node, vec![1; cluster.nodes.len()], "one nonce per node");
}

/// `--replay-redis-sentinel-tls` with `--replay-redis-ca`: a TLS-only sentinel naming a TLS
/// primary, both certificates from a private CA; the request is accepted once, then
/// `replayed`.
#[test]
fn a_private_ca_for_tls_sentinels() {
    let (primary, tls_port, files) = RedisServer::start_tls_files(&["127.0.0.1"]);
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], tls_port));
    let sentinel = SentinelServer::start_tls_only(tls_addr, &files, None, None);
    let (_dir, keyring) = keyring();
    let sentinel_addr = sentinel.addr().to_string();
    let ca_file = files.ca_file.display().to_string();
    let flags = [
        "--replay-redis",
        "rediss://",
        "--replay-redis-sentinel",
        &sentinel_addr,
        "--replay-redis-sentinel-master",
        SENTINEL_MASTER,
        "--replay-redis-sentinel-tls",
        "--replay-redis-ca",
        &ca_file,
    ];
    let request = signed(&keyring, "cli-tls-sentinel-nonce-01", Some(CREATED));
    let first = verify(&keyring, &request, &flags);
    assert_eq!(first.code, 0, "{} {}", first.stdout, first.stderr);
    let second = verify(&keyring, &request, &flags);
    assert_eq!(json(&second)["reason"], "replayed", "{}", second.stderr);
    let key = format!("{PREFIX}cli-tls-sentinel-nonce-01");
    assert_eq!(primary.cli(&["EXISTS", &key]), "1");
}

/// `--help` of both commands documents the cluster and sentinel options, the CA and the
/// host-less URL.
#[test]
fn help_documents_the_cluster_and_sentinel_options() {
    for command in ["verify", "demo-api"] {
        let out = run(&[command, "--help"], b"");
        assert_eq!(out.code, 0, "{command}: {}", out.stderr);
        for text in [
            "--replay-redis-cluster-node <HOST:PORT>",
            "--replay-redis-sentinel <HOST:PORT>",
            "--replay-redis-sentinel-master <NAME>",
            "--replay-redis-sentinel-password <PASSWORD>",
            "--replay-redis-sentinel-tls",
            "--replay-redis-ca <FILE>",
            "repeat the option or separate nodes with commas",
            "without a host",
        ] {
            assert!(
                out.stdout.contains(text),
                "{command} --help: {}",
                out.stdout
            );
        }
    }
}

//! Redis-backed state shared by a fleet: [`RedisConnection`] (one multiplexed connection,
//! remade when it dies, with a deadline on every call, shared by every Redis store of a
//! process) and [`RedisReplayCache`] (nonces recorded with one atomic `SET NX GET PX` each, so
//! every API process sharing the Redis rejects a request any of them has already seen).
//!
//! Fail closed: when Redis is unreachable or slow, every call returns an error within its
//! deadline; the caller answers 503 and lets nothing through. The connection is made lazily
//! and remade by itself, so a process started while Redis is down, or one whose Redis
//! restarted, resumes without a restart.
//!
//! Connecting is one attempt, made by the call that needs the connection, never retried with a
//! backoff inside the call: a refused connection or refused credentials fail the call at once
//! and the error says so (`Connection refused`, `authentication failed`, `NOAUTH`, ...); only an
//! attempt that gets no answer waits for `connect_timeout`. Calls that arrive while an attempt
//! runs wait for it and share its outcome, so an outage costs one attempt at a time, not one
//! per waiting request.
//!
//! Failover behind a stable address (a DNS name or TCP proxy that follows the primary): the
//! live connection stays on the old primary, now a replica. A call it answers with `READONLY`
//! (or `MASTERDOWN`, `LOADING`) is treated like a call on a dead connection: the connection is
//! dropped and the call made once more on a new one, which reaches the new primary. The
//! readiness check asks the server its role too, so a process connected to a replica reports
//! not-ready instead of ready-but-failing.
//!
//! Redis Sentinel ([`RedisConnection::sentinel`]): every (re)connection asks the sentinels for
//! the current primary of the monitored master (`SENTINEL MASTERS`), connects to the server it
//! names and checks that it answers `ROLE` as a primary, so the same drop-and-retry-once path
//! lands on the new primary after a failover. The sentinels are asked all at once and the first
//! usable answer wins: a sentinel that is down (refusing or silent) costs nothing while another
//! one answers, and a sentinel whose primary cannot be used is reported with the reason (refused
//! credentials, a TLS certificate not trusted or not valid for the announced address). TLS to
//! the primary is checked against the public web roots or a private CA
//! ([`RedisConnection::sentinel_with_tls_root_cert`]). The sentinels themselves are reached with
//! TLS too when asked ([`SentinelOptions::sentinel_tls`], or `rediss://` sentinel URLs), their
//! certificates checked against the same roots as the primary's: without it their answer (which
//! server is the primary) and their password travel in clear. The lookup and the connection
//! together stay within `connect_timeout`.
//!
//! Redis Cluster ([`RedisConnection::cluster`], with a private CA
//! [`RedisConnection::cluster_with_tls_root_cert`]): the `redis` crate's cluster client, made
//! lazily from seed nodes, sends each command to the primary of its key's hash slot and follows
//! `MOVED`/`ASK` after a failover or a resharding. [`RedisReplayCache`] works on it unchanged:
//! each nonce is one single-key `SET NX GET PX`, so the nonces spread over every primary. A
//! pipeline or script must keep all its keys in one slot (a hash tag, `{...}`, in the keys),
//! which is why the proxy's stores require one in their key prefix on a cluster. A new cluster
//! connection is used only once the cluster reports `cluster_state:ok` and every primary
//! answers (each asked by a slot it serves, or at its address when the crate's slot map still
//! names the node that served the slot before a failover, and checked with `CLUSTER MYID`) with
//! `maxmemory-policy noeviction`; the readiness check asks all of that again (a primary
//! promoted or added since is checked there, not before its first call, as a reconnected single
//! server between two readiness checks). What differs from a single server: a failed call is
//! not made again on a new connection (the crate reconnects to each node itself); while one
//! primary is down the calls whose keys it serves fail closed and readiness reports not-ready,
//! the other calls succeed until the cluster marks the node failed (then, with Redis' default
//! `cluster-require-full-coverage yes`, every call fails with `CLUSTERDOWN` until a replica
//! takes over); and a new connection (a process started meanwhile) is refused until every
//! primary answers. The closure of
//! [`RedisConnection::run`] receives a [`RedisLink`] (either kind of connection; it was a
//! `MultiplexedConnection` before cluster support).
//!
//! Eviction: every key written here has a time to live, so any `maxmemory-policy` but
//! `noeviction` (the `volatile-*` ones too) lets a full Redis drop live keys: a dropped nonce
//! re-opens the replay it guarded, a dropped session logs its user out, a dropped throttle
//! counter resets the throttle. Every new connection therefore reads the server's policy with
//! `INFO memory` before it is used (the readiness check reads it again), and a server that may
//! evict is refused like one that is down: the call fails closed, naming the policy and the fix.
//! A server that refuses `INFO` (an ACL without it, the command renamed away) is used, with a
//! warning per connection: its policy cannot be known.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, FromRedisValue,
    IntoConnectionInfo, Pipeline, RedisConnectionInfo, RedisError, RedisFuture, Value,
};
use arc_swap::ArcSwapOption;
use tokio::sync::Mutex as AsyncMutex;

use super::{ReplayCache, ReplayError, ReplayFuture, ReplayOutcome};

/// Default deadline for one Redis call (command, pipeline or script) on a live connection.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(500);
/// Default deadline for establishing the connection (TCP, TLS, AUTH, SELECT).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default deadline for the readiness `PING`.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_millis(250);
/// Default port of a sentinel given without one.
pub const DEFAULT_SENTINEL_PORT: u16 = 26379;
/// At most one warning per this interval about a connection that reached a replica, however
/// many calls found it (until the address leads to the primary, every new connection may).
const NOT_PRIMARY_WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// Tries of a cluster call after its first (a redirection, a node reconnected), within the
/// call's deadline.
const CLUSTER_RETRIES: u32 = 2;

/// Timeouts of a [`RedisConnection`]. Every Redis call is bounded by them, so a hung Redis
/// cannot hang a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisOptions {
    /// Deadline for one call on an established connection.
    pub op_timeout: Duration,
    /// Deadline for (re)establishing the connection; a call made while disconnected may take
    /// `connect_timeout + op_timeout`, and so may one that finds its connection dead (which
    /// it usually finds at once) after its first try. Only a Redis (or network) that does not
    /// answer uses it up: a refused connection or refused credentials fail at once.
    pub connect_timeout: Duration,
    /// Deadline for the readiness `PING`.
    pub ping_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        RedisOptions {
            op_timeout: DEFAULT_OP_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            ping_timeout: DEFAULT_PING_TIMEOUT,
        }
    }
}

/// Why a Redis call failed. The text never contains the URL's password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisCallError {
    message: String,
    /// A call (or the readiness check) on an established connection got no answer within its
    /// deadline ([`is_timeout`](Self::is_timeout)).
    timed_out: bool,
}

impl RedisCallError {
    fn new(message: String) -> Self {
        RedisCallError {
            message,
            timed_out: false,
        }
    }

    fn timeout(what: &str, after: Duration) -> Self {
        RedisCallError {
            message: format!("redis {what} timed out after {} ms", after.as_millis()),
            timed_out: true,
        }
    }

    fn connect_timeout(endpoint: &str, after: Duration) -> Self {
        Self::new(format!(
            "redis connect to {endpoint} timed out after {} ms (no answer)",
            after.as_millis()
        ))
    }

    /// Whether a call on an established connection got no answer within its deadline (the
    /// message says after how long): Redis too slow for the deadline, or the connection went
    /// silent. Not a connection attempt that timed out (its message says `connect`).
    pub fn is_timeout(&self) -> bool {
        self.timed_out
    }

    /// A failed connection attempt, with its cause in words an operator can act on. The
    /// `redis` crate's connection errors carry no URL, so no password either.
    fn connect(endpoint: &str, after: Duration, error: &RedisError) -> Self {
        if error.is_timeout() {
            return Self::connect_timeout(endpoint, after);
        }
        let message = if error.kind() == ErrorKind::AuthenticationFailed {
            // The crate folds the server's reply (WRONGPASS, or `ERR invalid password` before
            // Redis 6) into this kind, without its text.
            format!(
                "redis connect to {endpoint} failed: authentication failed (WRONGPASS: the \
                 server refused the user name or password of the URL): {error}"
            )
        } else if error.to_string().contains("driver unexpectedly terminated") {
            // The crate's words for "the server closed the connection during the setup".
            format!(
                "redis connect to {endpoint} failed: the server closed the connection during \
                 the setup (not Redis, a TLS port without rediss://, or a refused client, e.g. \
                 maxclients): {error}"
            )
        } else {
            format!("redis connect to {endpoint} failed: {error}")
        };
        Self::new(message)
    }

    /// A server whose `maxmemory-policy` may evict countersign's keys, refused. `policy` is
    /// the server's own word, quoted as text only (it is not a secret).
    fn eviction_policy(server: &str, policy: &str) -> Self {
        let policy: String = policy
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect();
        Self::new(format!(
            "redis server {server} runs with maxmemory-policy {policy}: when full it may \
             evict countersign's keys (all have a time to live), dropping live replay \
             nonces (re-opening the replays they guard), sessions and login-throttle \
             counters, so it is not used; set `maxmemory-policy noeviction` on it (CONFIG \
             SET and redis.conf, or the managed service's parameter group; \
             docs/DEPLOYMENT.md)"
        ))
    }

    fn redis(error: &RedisError) -> Self {
        let text = error.to_string();
        let hint = match error.code() {
            Some("NOAUTH") => " (the server requires a password and the URL has none)",
            // What a Redis before 7.0 answers, from inside the stores' scripts, to the 7.0
            // forms they use (the login throttle's `EXPIRE .. NX`); readiness and the startup
            // check name such a server's version, and this says it where the call failed.
            _ if text.contains(OLD_SERVER_SCRIPT_ERROR) => {
                " (what a Redis before 7.0 answers to the 7.0 forms of countersign's scripts, \
                 e.g. EXPIRE .. NX: countersign needs Redis 7.0 or later; `check-config \
                 --online` names the server's version)"
            }
            _ => "",
        };
        RedisCallError {
            message: format!("redis error: {text}{hint}"),
            timed_out: error.is_timeout(),
        }
    }
}

/// The error a Redis before 7.0 raises in a script calling a command with arguments it does
/// not know (Redis 7.0 and later word it "... from script").
const OLD_SERVER_SCRIPT_ERROR: &str = "Wrong number of args calling Redis command From Lua script";

impl fmt::Display for RedisCallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RedisCallError {}

/// A Redis URL that could not be used (bad syntax, unsupported scheme).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrlError {
    message: String,
}

impl fmt::Display for RedisUrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RedisUrlError {}

/// The connection [`RedisConnection::run`] hands its closure: to one server (a URL, or the
/// primary Redis Sentinel names), or to a Redis Cluster ([`RedisConnection::cluster`]), where
/// each command goes to the primary of its key's hash slot (a pipeline or script: of its first
/// key; all its keys must share that slot). Implements [`redis::aio::ConnectionLike`], so
/// `cmd.query_async(&mut link)` works on both. Cheap to clone; clones share the sockets.
///
/// (Before Redis Cluster support the closure received a `MultiplexedConnection`.)
#[derive(Clone)]
pub struct RedisLink {
    kind: LinkKind,
}

#[derive(Clone)]
enum LinkKind {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            LinkKind::Single(_) => "single",
            LinkKind::Cluster(_) => "cluster",
        };
        f.debug_struct("RedisLink").field("kind", &kind).finish()
    }
}

impl RedisLink {
    fn single(connection: MultiplexedConnection) -> Self {
        RedisLink {
            kind: LinkKind::Single(connection),
        }
    }

    /// Whether this is a connection to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, LinkKind::Cluster(_))
    }
}

impl ConnectionLike for RedisLink {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.kind {
            LinkKind::Single(connection) => connection.req_packed_command(cmd),
            LinkKind::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.kind {
            LinkKind::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            LinkKind::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match &self.kind {
            LinkKind::Single(connection) => connection.get_db(),
            LinkKind::Cluster(connection) => connection.get_db(),
        }
    }
}

/// Why `url` is refused for having a fragment (`#...`): none is part of a Redis URL, and the
/// `redis` crate reads `rediss://host/#insecure` as "TLS without checking the server's
/// certificate" (a connection then fails at every call, this build having no such mode), any
/// other fragment as an error at the first call. Said when the URL is given instead. A `#` in
/// a password is written `%23`. The message never quotes the URL.
fn fragment_problem(url: &str) -> Option<&'static str> {
    url.contains('#').then_some(
        "a fragment (`#...`) is not part of a Redis URL: `#insecure` (TLS without checking \
         the server's certificate) is not supported (a private CA is given as a root \
         certificate instead), and a `#` in a password is written %23",
    )
}

/// What is wrong with the query (`?...`) of a `redis://` or `rediss://` URL, if anything: the
/// `redis` crate reads only `protocol` from it and ignores anything else without a word, so
/// `?ssl=true` would connect in clear, `?db=3` use database 0, `?password=..` send none. The
/// message never quotes the URL (nor the parameter: it may be a password).
fn query_problem(url: &str) -> Option<&'static str> {
    let url = url.trim_start_matches(|c: char| c <= ' ');
    let (scheme, rest) = url.split_once("://")?;
    if !(scheme.eq_ignore_ascii_case("redis") || scheme.eq_ignore_ascii_case("rediss")) {
        return None;
    }
    let query = rest.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or("");
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .any(|pair| pair.split('=').next() != Some("protocol"))
        .then_some(
            "a query (`?...`) is not part of a Redis URL: its parameters would be ignored (TLS \
             is rediss://, the database the /db path, credentials user:password@ before the \
             host); only `protocol` (the RESP version) is read",
        )
}

/// What is wrong with the port written in a `redis://` or `rediss://` URL, if anything. The
/// URL parser reads an empty port (`host:`) as none, i.e. 6379, so a typo would silently reach
/// another server; and port 0 is accepted but can never be connected to, so the mistake would
/// only show as "unavailable" at the first call. The message never quotes the URL (it may hold
/// a password), nor the port text (a password with a `/` in it can end up there).
fn written_port_problem(url: &str) -> Option<&'static str> {
    // As the URL parser reads the scheme (`REDIS://`, leading blanks and controls dropped),
    // and `query_problem` too: `REDIS://cache:/0` reached port 6379.
    let url = url.trim_start_matches(|c: char| c <= ' ');
    let (scheme, rest) = url.split_once("://")?;
    if !(scheme.eq_ignore_ascii_case("redis") || scheme.eq_ignore_ascii_case("rediss")) {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let port = match host_port.strip_prefix('[') {
        // An IPv6 literal: the port follows the closing bracket.
        Some(v6) => v6
            .split_once(']')
            .and_then(|(_, after)| after.strip_prefix(':')),
        None => host_port.split_once(':').map(|(_, port)| port),
    }?;
    if port.is_empty() {
        return Some(
            "empty port after \":\" (write the port, or leave out the colon for the default \
             port 6379)",
        );
    }
    match port.parse::<u16>() {
        Ok(number) if number != 0 && port.bytes().all(|b| b.is_ascii_digit()) => None,
        _ => Some("the port is not a number from 1 to 65535"),
    }
}

/// One lazily made, self-healing connection to Redis: a `redis` crate
/// [`MultiplexedConnection`] (concurrent calls share one socket), replaced by a new one when a
/// call finds it dead. Cheap to clone; clones share the connection.
///
/// `Debug` shows the endpoint, never the password.
#[derive(Clone)]
pub struct RedisConnection {
    inner: Arc<ConnectionInner>,
}

struct ConnectionInner {
    /// Where connections go.
    target: Target,
    /// Settings of every new connection (its connect and response deadlines).
    config: AsyncConnectionConfig,
    /// The connection in use: `None` before the first call, after a failed attempt and after
    /// a call found it dead.
    current: ArcSwapOption<RedisLink>,
    /// Held while a connection attempt runs (one at a time). Holds the error of the last
    /// failed attempt: a caller that waited for that attempt returns it instead of making
    /// another one straight away.
    connecting: AsyncMutex<Option<RedisCallError>>,
    /// Connection attempts finished, to tell whether one finished while a caller waited.
    attempts: AtomicU64,
    options: RedisOptions,
    endpoint: String,
    /// Whether the last call succeeded: failures are logged once per outage (at the
    /// transition), not once per request.
    healthy: AtomicBool,
    /// When a connection was last dropped for reaching a server that is not the primary (and
    /// that was logged): the warning is rate limited.
    not_primary_warned: Mutex<Option<Instant>>,
    /// Whether the server refused `INFO` on the connection in use: the readiness check then
    /// does not ask again (each refusal would be an entry in the server's ACL LOG).
    info_refused: AtomicBool,
    /// Whether outages are logged ("redis unavailable", "redis reachable again"): off for a
    /// one-shot check that reports its own outcome ([`RedisConnection::set_outage_log`]).
    log_outages: AtomicBool,
}

/// Where a [`RedisConnection`] connects.
enum Target {
    /// One address (a URL).
    Direct(Client),
    /// The primary the sentinels name, asked anew at every connection.
    Sentinel(SentinelTarget),
    /// A Redis Cluster, found from its seed nodes.
    Cluster(ClusterTarget),
}

struct ClusterTarget {
    client: ClusterClient,
    /// Each seed node (`host:port`) and a client for it alone: the crate's cluster client
    /// reports only "Failed to create initial connections" when no seed can be used, so a
    /// failed connection asks them one by one for the reason (refused, a certificate, ...).
    seeds: Vec<(String, Client)>,
}

impl ClusterTarget {
    /// Why no seed node could be used: each one connected to directly (with the cluster's
    /// credentials and TLS), at once, its failure in words; `None` if one of them connects (the
    /// crate's own error says more then).
    async fn seed_failures(
        &self,
        config: &AsyncConnectionConfig,
        budget: Duration,
    ) -> Option<String> {
        let mut probes = tokio::task::JoinSet::new();
        for (index, (_, client)) in self.seeds.iter().enumerate() {
            let (client, config) = (client.clone(), config.clone());
            probes.spawn(async move {
                let outcome = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(drop);
                (index, outcome)
            });
        }
        let mut failures: Vec<Option<String>> = vec![None; self.seeds.len()];
        while let Some(joined) = probes.join_next().await {
            match joined {
                Ok((_, Ok(()))) => return None,
                Ok((index, Err(error))) => {
                    let name = &self.seeds[index].0;
                    failures[index] =
                        Some(RedisCallError::connect(name, budget, &error).to_string());
                }
                Err(_) => {}
            }
        }
        Some(
            failures
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; "),
        )
    }
}

struct SentinelTarget {
    /// Each sentinel: its `host:port` (for messages) and how to reach it.
    sentinels: Vec<SentinelNode>,
    master_name: String,
    /// Credentials, database and TLS of the connections to the primary.
    node: PrimaryNode,
}

/// One sentinel: how messages name it (`host:port`, `rediss://host:port` when reached with
/// TLS) and a client for it (with the private CA, if any, for TLS).
#[derive(Clone)]
struct SentinelNode {
    name: String,
    client: Client,
    tls: bool,
}

/// How to reach the primary a sentinel names: its credentials and database, whether with TLS,
/// and the roots its certificate is checked against.
#[derive(Clone)]
struct PrimaryNode {
    redis: RedisConnectionInfo,
    tls: bool,
    /// PEM certificate(s) replacing the public web roots (a private CA); `None`: the public
    /// web roots.
    root_cert: Option<Vec<u8>>,
}

/// `host:port` over TCP, with TLS (the certificate checked, valid for `host`) or without.
fn tcp_addr(host: String, port: u16, tls: bool) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host, port)
    }
}

impl PrimaryNode {
    /// A client for the primary at `host:port` (as the sentinel announces it: the certificate
    /// must be valid for that name).
    fn client(&self, host: String, port: u16) -> Result<Client, RedisError> {
        let addr = tcp_addr(host, port, self.tls);
        let info = ConnectionInfo {
            addr,
            redis: self.redis.clone(),
        };
        client_with_roots(info, self.root_cert.as_deref())
    }
}

/// A client for one server, whose TLS certificate (with a `rediss://` address) is checked
/// against `root_cert` (PEM: a private CA) instead of the public web roots when given.
fn client_with_roots(info: ConnectionInfo, root_cert: Option<&[u8]>) -> Result<Client, RedisError> {
    match root_cert {
        Some(pem) => Client::build_with_tls(
            info,
            ::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
        None => Client::open(info),
    }
}

/// The data-connection settings of a [`RedisConnection::sentinel`] connection (user name,
/// password, database and TLS of the connection to the primary), and the credentials of the
/// sentinels themselves. `Debug` never shows the passwords.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SentinelOptions {
    /// ACL user name on the primary (`AUTH user password`); `None` for the default user.
    pub username: Option<String>,
    /// Password on the primary.
    pub password: Option<String>,
    /// Database number on the primary.
    pub db: i64,
    /// TLS to the primary, verified against the public web roots (or a private CA:
    /// [`RedisConnection::sentinel_with_tls_root_cert`]). The sentinels report the primary's
    /// address as they know it (an IP unless they announce host names), and the certificate
    /// must be valid for that name.
    pub tls: bool,
    /// ACL user name on the sentinels (a sentinel URL's own user wins).
    pub sentinel_username: Option<String>,
    /// Password on the sentinels (`requirepass` in the sentinel's config; a sentinel URL's
    /// own password wins).
    pub sentinel_password: Option<String>,
    /// TLS to the sentinels given as `host:port` (a `rediss://` sentinel URL always uses TLS;
    /// a `redis://` one is refused with this set). Each sentinel's certificate is checked
    /// against the same roots as the primary's (the public web roots, or the private CA of
    /// [`RedisConnection::sentinel_with_tls_root_cert`]) and must be valid for the host written
    /// in its entry. Without TLS, the sentinels' answer (which server is the primary) and
    /// their password cross the network unauthenticated and in clear.
    pub sentinel_tls: bool,
}

impl fmt::Debug for SentinelOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |secret: &Option<String>| secret.as_ref().map(|_| "[redacted]");
        f.debug_struct("SentinelOptions")
            .field("username", &self.username)
            .field("password", &redacted(&self.password))
            .field("db", &self.db)
            .field("tls", &self.tls)
            .field("sentinel_username", &self.sentinel_username)
            .field("sentinel_password", &redacted(&self.sentinel_password))
            .field("sentinel_tls", &self.sentinel_tls)
            .finish()
    }
}

/// One sentinel address: `host:port`, `host` (port 26379), `[v6]:port` (with TLS when
/// `options.sentinel_tls`), or a `redis://` / `rediss://` URL (which may hold the sentinel's
/// own user and password). Returns its name for messages (`host:port`, or `rediss://host:port`
/// with TLS) and how to reach it.
fn sentinel_address(
    text: &str,
    options: &SentinelOptions,
) -> Result<(String, ConnectionInfo), String> {
    let text = text.trim();
    let mut info = if text.contains("://") {
        if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
            return Err("a sentinel URL must start with redis:// or rediss://".to_owned());
        }
        if options.sentinel_tls && !text.starts_with("rediss://") {
            return Err(
                "a redis:// (plain TCP) sentinel URL, but TLS to the sentinels is on \
                 (SentinelOptions::sentinel_tls): write rediss:// or host:port"
                    .to_owned(),
            );
        }
        if let Some(problem) = fragment_problem(text).or_else(|| query_problem(text)) {
            return Err(problem.to_owned());
        }
        // The parser's messages are fixed texts, never the URL.
        text.into_connection_info()
            .map_err(|e| format!("not a usable sentinel URL: {e}"))?
    } else {
        let (host, port) = match text.strip_prefix('[') {
            Some(rest) => {
                let (host, after) = rest
                    .split_once(']')
                    .ok_or_else(|| "an IPv6 address needs its closing \"]\"".to_owned())?;
                (host, after.strip_prefix(':'))
            }
            None => match text.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (text, None),
            },
        };
        if host.is_empty()
            || host
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || "/@?#[]".contains(c))
        {
            return Err("expected host:port (e.g. 10.0.0.1:26379)".to_owned());
        }
        let port = match port {
            None => DEFAULT_SENTINEL_PORT,
            Some(port) => match port.parse::<u16>() {
                Ok(n) if n != 0 && port.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("port {port:?} is not a number from 1 to 65535")),
            },
        };
        ConnectionInfo {
            addr: tcp_addr(host.to_owned(), port, options.sentinel_tls),
            redis: RedisConnectionInfo::default(),
        }
    };
    let host_port = |host: &str, port: &u16| {
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    };
    let name = match &info.addr {
        ConnectionAddr::Tcp(host, port) => host_port(host, port),
        ConnectionAddr::TcpTls { host, port, .. } => {
            format!("rediss://{}", host_port(host, port))
        }
        ConnectionAddr::Unix(path) => path.display().to_string(),
    };
    if info.redis.password.is_none() {
        info.redis.password.clone_from(&options.sentinel_password);
        if info.redis.username.is_none() {
            info.redis.username.clone_from(&options.sentinel_username);
        }
    }
    Ok((name, info))
}

/// A sentinel that names no primary for the master name.
const NO_USABLE_PRIMARY: &str = "no usable primary (the sentinel does not monitor that master \
    name, or reports it down: check the master name)";

/// A sentinel lookup's failure in words, without the URL or a password. `tls`: whether the
/// sentinel was reached with TLS.
fn sentinel_failure(error: &RedisError, tls: bool) -> String {
    let text = error.to_string();
    if tls && text.contains("certificate") {
        // rustls' words: `invalid peer certificate: UnknownIssuer`, `... NotValidForName`.
        return format!(
            "the sentinel's TLS certificate was refused (it must be issued by the trusted CA, \
             the same as the primary's: the private CA given, or the public web roots; and be \
             valid for the host of the sentinel's entry): {error}"
        );
    }
    if tls
        && error.kind() == ErrorKind::IoError
        && !error.is_timeout()
        && !error.is_connection_refusal()
    {
        return format!(
            "TLS to the sentinel failed (does it listen with TLS on this port? a sentinel's \
             TLS port is its `tls-port`): {error}"
        );
    }
    if !tls && (error.is_connection_dropped() || text.contains("driver unexpectedly terminated")) {
        // What a sentinel port that speaks only TLS does to a plain-TCP client.
        return format!(
            "the sentinel closed the connection (a TLS-only port reached without TLS? then turn \
             TLS to the sentinels on: session.redis_sentinel_tls in proxy.toml, \
             SentinelOptions::sentinel_tls in the library): {error}"
        );
    }
    if error.kind() == ErrorKind::AuthenticationFailed {
        return format!(
            "authentication failed (the sentinel refused the sentinel user name or password): \
             {error}"
        );
    }
    match error.code() {
        Some("NOAUTH") => {
            format!("{error} (the sentinel requires a password and none is configured for it)")
        }
        _ => error.to_string(),
    }
}

impl SentinelTarget {
    /// The current primary, as the first sentinel with a usable answer names it: every
    /// sentinel is asked at once (one task each, aborted once an answer is in or `deadline`
    /// passes), so a sentinel that is down does not delay the lookup. Each lookup uses fresh
    /// connections to the sentinels: a lookup happens only when a connection is (re)made, and
    /// no connection to a sentinel that died silently is kept.
    ///
    /// A sentinel's answer is used only once the server it names has been connected to (TLS,
    /// credentials, database) and answered `ROLE` as a primary: that connection is the one
    /// returned, with the primary's address for messages. A sentinel whose answer cannot be
    /// used is reported with the reason (e.g. the primary's certificate), and another
    /// sentinel's answer may still win.
    async fn primary(
        &self,
        deadline: tokio::time::Instant,
        budget: Duration,
        config: &AsyncConnectionConfig,
    ) -> Result<(MultiplexedConnection, String), RedisCallError> {
        let mut lookups = tokio::task::JoinSet::new();
        for (index, sentinel) in self.sentinels.iter().enumerate() {
            let sentinel = sentinel.clone();
            let master_name = self.master_name.clone();
            let node = self.node.clone();
            let config = config.clone();
            lookups.spawn(async move {
                let result = ask_sentinel(&sentinel, &master_name, &node, &config, budget).await;
                (index, result)
            });
        }
        let mut failures: Vec<Option<String>> = vec![None; self.sentinels.len()];
        loop {
            match tokio::time::timeout_at(deadline, lookups.join_next()).await {
                Ok(Some(Ok((_, Ok(primary))))) => return Ok(primary),
                Ok(Some(Ok((index, Err(failure))))) => {
                    failures[index] = Some(failure);
                }
                Ok(Some(Err(_))) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let each = self
            .sentinels
            .iter()
            .zip(failures)
            .map(|(sentinel, failure)| {
                let failure = failure.unwrap_or_else(|| {
                    let hint = if sentinel.tls {
                        " (with TLS: a sentinel port without TLS may leave the handshake \
                         unanswered)"
                    } else {
                        ""
                    };
                    format!("no answer within {} ms{hint}", budget.as_millis())
                });
                format!("{}: {failure}", sentinel.name)
            })
            .collect::<Vec<_>>()
            .join("; ");
        Err(RedisCallError::new(format!(
            "redis sentinel lookup of the primary {:?} failed: {each}",
            self.master_name
        )))
    }
}

/// One sentinel asked for the primary of `master_name` (`SENTINEL MASTERS`: the entry of that
/// name, flagged master and not down), then that primary connected to and asked its `ROLE`.
/// The connection to the primary, and its address for messages; or what went wrong, in words
/// without a password.
async fn ask_sentinel(
    sentinel: &SentinelNode,
    master_name: &str,
    node: &PrimaryNode,
    config: &AsyncConnectionConfig,
    budget: Duration,
) -> Result<(MultiplexedConnection, String), String> {
    // No deadline of its own: the caller's (the whole lookup's) bounds it, and a sentinel that
    // does not answer is reported as such ("no answer within ...").
    let masters: Vec<HashMap<String, String>> = async {
        let mut connection = sentinel.client.get_multiplexed_async_connection().await?;
        ::redis::cmd("SENTINEL")
            .arg("MASTERS")
            .query_async(&mut connection)
            .await
    }
    .await
    .map_err(|error| sentinel_failure(&error, sentinel.tls))?;
    let (host, port) =
        named_primary(&masters, master_name).ok_or_else(|| NO_USABLE_PRIMARY.to_owned())?;
    let client = node
        .client(host, port)
        .map_err(|error| format!("the primary it names cannot be used: {error}"))?;
    let primary = format!(
        "{} (primary {master_name:?} per sentinel)",
        address_text(&client.get_connection_info().addr)
    );
    let unusable = |problem: String| format!("the primary it names cannot be used: {problem}");
    let mut connection = client
        .get_multiplexed_async_connection_with_config(config)
        .await
        .map_err(|error| unusable(RedisCallError::connect(&primary, budget, &error).to_string()))?;
    let role: Value = ::redis::cmd("ROLE")
        .query_async(&mut connection)
        .await
        .map_err(|error| {
            unusable(format!(
                "{primary}: ROLE failed: {}",
                RedisCallError::redis(&error)
            ))
        })?;
    if !role_is_primary(&role) {
        return Err(unusable(format!(
            "{primary} does not answer ROLE as a primary (a failover in progress, or the \
             sentinel's view is stale)"
        )));
    }
    Ok((connection, primary))
}

/// The address of `master_name` in a `SENTINEL MASTERS` reply, if the sentinel sees it as a
/// primary that is up.
fn named_primary(masters: &[HashMap<String, String>], master_name: &str) -> Option<(String, u16)> {
    masters.iter().find_map(|master| {
        if master.get("name").map(String::as_str) != Some(master_name) {
            return None;
        }
        let flags = master.get("flags")?;
        if !flags.split(',').any(|flag| flag == "master")
            || flags
                .split(',')
                .any(|flag| flag == "s_down" || flag == "o_down")
        {
            return None;
        }
        let port = master.get("port")?.parse::<u16>().ok()?;
        Some((master.get("ip")?.clone(), port))
    })
}

/// Whether a `ROLE` reply says `master`.
fn role_is_primary(role: &Value) -> bool {
    let Value::Array(items) = role else {
        return false;
    };
    match items.first() {
        Some(Value::BulkString(bytes)) => bytes.eq_ignore_ascii_case(b"master"),
        Some(Value::SimpleString(text)) => text.eq_ignore_ascii_case("master"),
        _ => false,
    }
}

/// `host:port` of a connection address, for messages.
fn address_text(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}"),
        ConnectionAddr::TcpTls { host, port, .. } => format!("rediss://{host}:{port}"),
        ConnectionAddr::Unix(path) => format!("redis+unix://{}", path.display()),
    }
}

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConnection")
            .field("endpoint", &self.inner.endpoint)
            .field("options", &self.inner.options)
            .finish()
    }
}

impl RedisConnection {
    /// Parses `url` (`redis://[user:password@]host[:port][/db]`, `rediss://` for TLS,
    /// `redis+unix:///path`; a port, when written, from 1 to 65535: `host:` and `host:0` are
    /// refused) with default timeouts. Does not connect: the first call does, so
    /// a process can start while Redis is down (and reports not-ready until it is up).
    pub fn open(url: &str) -> Result<Self, RedisUrlError> {
        Self::with_options(url, RedisOptions::default())
    }

    /// Like [`RedisConnection::open`] with explicit timeouts.
    pub fn with_options(url: &str, options: RedisOptions) -> Result<Self, RedisUrlError> {
        Self::build(url, options, None)
    }

    /// Like [`RedisConnection::with_options`] for a `rediss://` URL whose server certificate
    /// is issued by a private CA: `root_cert_pem` (PEM) replaces the public web roots.
    pub fn with_tls_root_cert(
        url: &str,
        options: RedisOptions,
        root_cert_pem: &[u8],
    ) -> Result<Self, RedisUrlError> {
        if !url.starts_with("rediss://") {
            return Err(RedisUrlError {
                message: "a TLS root certificate needs a rediss:// URL".to_owned(),
            });
        }
        // An empty trust store would refuse every server, as late as the first request: say so
        // now. (Malformed certificate blocks are refused by the TLS setup below.)
        if !has_pem_certificate(root_cert_pem) {
            return Err(RedisUrlError {
                message: "the TLS root certificate file holds no PEM certificate".to_owned(),
            });
        }
        Self::build(
            url,
            options,
            Some(::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert_pem.to_vec()),
            }),
        )
    }

    fn build(
        url: &str,
        options: RedisOptions,
        tls: Option<::redis::TlsCertificates>,
    ) -> Result<Self, RedisUrlError> {
        if let Some(problem) = fragment_problem(url)
            .or_else(|| written_port_problem(url))
            .or_else(|| query_problem(url))
        {
            return Err(RedisUrlError {
                message: format!("invalid redis URL: {problem}"),
            });
        }
        // The parser's own messages may quote the URL, password included; say what is wrong
        // in our own words instead.
        let info = url.into_connection_info().map_err(|e| RedisUrlError {
            message: format!(
                "invalid redis URL (expected redis://[user:password@]host[:port][/db], \
                 rediss://... or redis+unix:///path): {}",
                e
            ),
        })?;
        let endpoint = match &info.addr {
            ConnectionAddr::Tcp(host, port) => format!("redis://{host}:{port}/{}", info.redis.db),
            ConnectionAddr::TcpTls { host, port, .. } => {
                format!("rediss://{host}:{port}/{}", info.redis.db)
            }
            ConnectionAddr::Unix(path) => format!("redis+unix://{}", path.display()),
        };
        let client = match tls {
            None => Client::open(info),
            Some(certificates) => Client::build_with_tls(info, certificates),
        }
        .map_err(|e| RedisUrlError {
            message: format!("unusable redis URL or TLS settings: {e}"),
        })?;
        Ok(Self::from_target(Target::Direct(client), endpoint, options))
    }

    /// A connection to the primary that Redis Sentinel names: `sentinels` (at least one, each
    /// `host:port`, `host` for port 26379, `[v6]:port`, or a `redis://` URL that may carry the
    /// sentinel's own password; `rediss://`, or `node.sentinel_tls`, for TLS to the sentinel,
    /// checked against the public web roots) are asked for the current primary of
    /// `master_name` at every (re)connection, so after a failover the next call lands on the
    /// new primary (a call refused by the demoted one with `READONLY` is made once more, as
    /// with [`RedisConnection::with_options`]). `node` holds the credentials, database and TLS
    /// of the connection to the primary (and the sentinels' password and TLS); `options` the
    /// timeouts, `connect_timeout` bounding the lookup and the connection together. Does not
    /// connect.
    pub fn sentinel<S: AsRef<str>>(
        sentinels: &[S],
        master_name: &str,
        node: &SentinelOptions,
        options: RedisOptions,
    ) -> Result<Self, RedisUrlError> {
        Self::sentinel_with_roots(sentinels, master_name, node, options, None)
    }

    /// Like [`RedisConnection::sentinel`] with TLS (to the primary, `node.tls`, and/or to the
    /// sentinels, `node.sentinel_tls` or `rediss://` sentinel URLs: at least one must be set)
    /// checked against `root_cert_pem` (PEM: a private CA) instead of the public web roots.
    /// The primary's certificate must be valid for the address the sentinels announce, each
    /// sentinel's for the host of its entry.
    pub fn sentinel_with_tls_root_cert<S: AsRef<str>>(
        sentinels: &[S],
        master_name: &str,
        node: &SentinelOptions,
        options: RedisOptions,
        root_cert_pem: &[u8],
    ) -> Result<Self, RedisUrlError> {
        let tls_sentinels = node.sentinel_tls
            || sentinels
                .iter()
                .any(|s| s.as_ref().trim().starts_with("rediss://"));
        if !node.tls && !tls_sentinels {
            return Err(RedisUrlError {
                message: "a TLS root certificate needs TLS to the primary (SentinelOptions::tls, \
                          a rediss:// URL) or to the sentinels (SentinelOptions::sentinel_tls, \
                          rediss:// sentinel URLs)"
                    .to_owned(),
            });
        }
        if !has_pem_certificate(root_cert_pem) {
            return Err(RedisUrlError {
                message: "the TLS root certificate file holds no PEM certificate".to_owned(),
            });
        }
        // Malformed certificate blocks are refused now rather than at every connection.
        let probe = PrimaryNode {
            redis: RedisConnectionInfo::default(),
            tls: true,
            root_cert: Some(root_cert_pem.to_vec()),
        };
        probe
            .client("localhost".to_owned(), 6379)
            .map_err(|e| RedisUrlError {
                message: format!("unusable TLS root certificate: {e}"),
            })?;
        Self::sentinel_with_roots(
            sentinels,
            master_name,
            node,
            options,
            Some(root_cert_pem.to_vec()),
        )
    }

    fn sentinel_with_roots<S: AsRef<str>>(
        sentinels: &[S],
        master_name: &str,
        node: &SentinelOptions,
        options: RedisOptions,
        root_cert: Option<Vec<u8>>,
    ) -> Result<Self, RedisUrlError> {
        if sentinels.is_empty() {
            return Err(RedisUrlError {
                message: "at least one sentinel is needed".to_owned(),
            });
        }
        if master_name.is_empty()
            || master_name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(RedisUrlError {
                message: format!(
                    "invalid sentinel master name {master_name:?} (the name of a `sentinel \
                     monitor` line: not empty, no spaces)"
                ),
            });
        }
        let sentinels = sentinels
            .iter()
            .enumerate()
            .map(|(index, text)| {
                let problem = |problem: String| RedisUrlError {
                    message: format!("sentinel {} (of {}): {problem}", index + 1, sentinels.len()),
                };
                let (name, info) = sentinel_address(text.as_ref(), node).map_err(problem)?;
                let tls = matches!(info.addr, ConnectionAddr::TcpTls { .. });
                // The private CA, if any, is the trust of every TLS connection: the sentinels'
                // as the primary's.
                let client = client_with_roots(info, root_cert.as_deref().filter(|_| tls))
                    .map_err(|e| {
                        problem(format!("unusable sentinel address or TLS settings: {e}"))
                    })?;
                Ok(SentinelNode { name, client, tls })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let names: Vec<&str> = sentinels.iter().map(|s| s.name.as_str()).collect();
        let endpoint = format!(
            "{}+sentinel://{}/{master_name}/{}",
            if node.tls { "rediss" } else { "redis" },
            names.join(","),
            node.db
        );
        let target = SentinelTarget {
            sentinels,
            master_name: master_name.to_owned(),
            node: PrimaryNode {
                redis: RedisConnectionInfo {
                    db: node.db,
                    username: node.username.clone(),
                    password: node.password.clone(),
                    ..RedisConnectionInfo::default()
                },
                tls: node.tls,
                root_cert,
            },
        };
        Ok(Self::from_target(
            Target::Sentinel(target),
            endpoint,
            options,
        ))
    }

    /// A connection to a Redis Cluster. `nodes` are seed nodes (at least one, ideally several:
    /// any one that answers gives the cluster's layout), each `redis://[user:password@]host:port`
    /// or `rediss://...` for TLS checked against the public web roots; all with the same user,
    /// password and scheme (`redis://` and `rediss://` mixed are refused), no query but
    /// `?protocol=`, and no database but 0 (a cluster has only database 0). Each command
    /// goes to the primary of its key's hash slot; a pipeline or script to the slot of its first
    /// key, and all its keys must hash to that slot (Redis refuses it otherwise, and the call
    /// fails closed). Does not connect.
    ///
    /// The guarantees of the other connections hold per primary: every call is bounded by
    /// `op_timeout` (a new connection by `connect_timeout`); calls whose slot's primary is down
    /// fail closed; a connection is used only once the cluster reports `cluster_state:ok` and
    /// every primary in `CLUSTER SLOTS` answers (as itself: `CLUSTER MYID`) with
    /// `maxmemory-policy noeviction`, and [`ping`](Self::ping) checks all of that again.
    /// Unlike the other connections, a call is not made again on a new connection when it
    /// fails: the `redis` crate's cluster client reconnects to each node itself and follows
    /// `MOVED`/`ASK` redirections (a failover, a resharding) within the call's deadline.
    pub fn cluster<S: AsRef<str>>(
        nodes: &[S],
        options: RedisOptions,
    ) -> Result<Self, RedisUrlError> {
        Self::cluster_with_roots(nodes, options, None)
    }

    /// Like [`RedisConnection::cluster`] with `rediss://` node URLs whose certificates are
    /// issued by a private CA: `root_cert_pem` (PEM) replaces the public web roots. Each node's
    /// certificate must be valid for the address the cluster announces for it (an IP, unless
    /// the nodes announce host names: `cluster-preferred-endpoint-type`).
    pub fn cluster_with_tls_root_cert<S: AsRef<str>>(
        nodes: &[S],
        options: RedisOptions,
        root_cert_pem: &[u8],
    ) -> Result<Self, RedisUrlError> {
        if !nodes
            .iter()
            .all(|node| node.as_ref().trim().starts_with("rediss://"))
        {
            return Err(RedisUrlError {
                message: "a TLS root certificate needs rediss:// cluster node URLs".to_owned(),
            });
        }
        if !has_pem_certificate(root_cert_pem) {
            return Err(RedisUrlError {
                message: "the TLS root certificate file holds no PEM certificate".to_owned(),
            });
        }
        Self::cluster_with_roots(nodes, options, Some(root_cert_pem.to_vec()))
    }

    fn cluster_with_roots<S: AsRef<str>>(
        nodes: &[S],
        options: RedisOptions,
        root_cert: Option<Vec<u8>>,
    ) -> Result<Self, RedisUrlError> {
        if nodes.is_empty() {
            return Err(RedisUrlError {
                message: "at least one cluster node is needed".to_owned(),
            });
        }
        let mut infos = Vec::with_capacity(nodes.len());
        let mut names = Vec::with_capacity(nodes.len());
        for (index, text) in nodes.iter().enumerate() {
            let text = text.as_ref().trim();
            let problem = |problem: &str| RedisUrlError {
                message: format!("cluster node {} (of {}): {problem}", index + 1, nodes.len()),
            };
            if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
                return Err(problem(
                    "a cluster node URL must start with redis:// or rediss://",
                ));
            }
            if let Some(port_problem) = fragment_problem(text)
                .or_else(|| written_port_problem(text))
                .or_else(|| query_problem(text))
            {
                return Err(problem(port_problem));
            }
            // The parser's messages are fixed texts, never the URL.
            let info = text
                .into_connection_info()
                .map_err(|e| problem(&format!("not a usable redis URL: {e}")))?;
            if info.redis.db != 0 {
                return Err(problem(
                    "a Redis Cluster has only database 0: leave the /db out of the URL",
                ));
            }
            // The crate reaches every node the way it reaches the first (its TLS mode), and
            // checks the others' scheme only when the first has TLS: a rediss:// node after a
            // redis:// one was reached in clear, its password sent unencrypted.
            let tls = matches!(info.addr, ConnectionAddr::TcpTls { .. });
            if infos.first().is_some_and(|first: &ConnectionInfo| {
                matches!(first.addr, ConnectionAddr::TcpTls { .. }) != tls
            }) {
                return Err(problem(
                    "rediss:// and redis:// nodes mixed: every node is reached with the first \
                     one's scheme, so write the same one (rediss:// for TLS) for all",
                ));
            }
            let name = match &info.addr {
                ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                    if host.contains(':') {
                        format!("[{host}]:{port}")
                    } else {
                        format!("{host}:{port}")
                    }
                }
                ConnectionAddr::Unix(_) => {
                    return Err(problem(
                        "a cluster node needs host:port (the cluster announces TCP addresses)",
                    ))
                }
            };
            names.push(name);
            infos.push(info);
        }
        let tls = infos
            .first()
            .is_some_and(|info| matches!(info.addr, ConnectionAddr::TcpTls { .. }));
        let endpoint = format!(
            "{}+cluster://{}",
            if tls { "rediss" } else { "redis" },
            names.join(",")
        );
        let seeds = names
            .iter()
            .cloned()
            .zip(infos.iter().cloned())
            .map(|(name, info)| {
                client_with_roots(info, root_cert.as_deref()).map(|client| (name, client))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RedisUrlError {
                message: format!("unusable cluster node URLs or TLS settings: {e}"),
            })?;
        let mut builder = ClusterClient::builder(infos)
            .connection_timeout(options.connect_timeout)
            .response_timeout(options.op_timeout)
            // A redirection after a failover or a resharding takes one more try; the call's
            // deadline bounds them all.
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(10)
            .max_retry_wait(100);
        if let Some(pem) = root_cert {
            builder = builder.certs(::redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem),
            });
        }
        // The crate's messages are fixed texts ("Cannot use different password among initial
        // nodes."), never a URL.
        let client = builder.build().map_err(|e| RedisUrlError {
            message: format!("unusable cluster node URLs or TLS settings: {e}"),
        })?;
        Ok(Self::from_target(
            Target::Cluster(ClusterTarget { client, seeds }),
            endpoint,
            options,
        ))
    }

    fn from_target(target: Target, endpoint: String, options: RedisOptions) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(options.connect_timeout)
            .set_response_timeout(options.op_timeout);
        RedisConnection {
            inner: Arc::new(ConnectionInner {
                target,
                config,
                current: ArcSwapOption::empty(),
                connecting: AsyncMutex::new(None),
                attempts: AtomicU64::new(0),
                options,
                endpoint,
                healthy: AtomicBool::new(true),
                not_primary_warned: Mutex::new(None),
                info_refused: AtomicBool::new(false),
                log_outages: AtomicBool::new(true),
            }),
        }
    }

    /// The endpoint without credentials, for logs.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// The timeouts in force.
    pub fn options(&self) -> RedisOptions {
        self.inner.options
    }

    /// The connection in use, connecting first if there is none (bounded by
    /// `connect_timeout`, waiting for another caller's attempt included).
    async fn connection(&self) -> Result<Arc<RedisLink>, RedisCallError> {
        if let Some(connection) = self.inner.current.load_full() {
            return Ok(connection);
        }
        let after = self.inner.options.connect_timeout;
        let deadline = deadline_after(after);
        match tokio::time::timeout_at(deadline, self.connect(deadline)).await {
            Ok(result) => result,
            Err(_) => Err(RedisCallError::connect_timeout(self.endpoint(), after)),
        }
    }

    /// One connection attempt, or the outcome of the one that finished while this caller
    /// waited for its turn.
    async fn connect(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<RedisLink>, RedisCallError> {
        let inner = &*self.inner;
        let seen = inner.attempts.load(Ordering::Acquire);
        let mut last_error = inner.connecting.lock().await;
        if let Some(connection) = inner.current.load_full() {
            return Ok(connection);
        }
        if inner.attempts.load(Ordering::Acquire) != seen {
            if let Some(error) = last_error.as_ref() {
                return Err(error.clone());
            }
        }
        // One attempt, no backoff: refused connections and credentials come back at once
        // with their cause; the next call makes the next attempt.
        let attempt = match &inner.target {
            Target::Direct(client) => client
                .get_multiplexed_async_connection_with_config(&inner.config)
                .await
                .map(|connection| (RedisLink::single(connection), inner.endpoint.clone()))
                .map_err(|error| {
                    RedisCallError::connect(&inner.endpoint, inner.options.connect_timeout, &error)
                }),
            Target::Sentinel(target) => self
                .connect_via_sentinel(target, deadline)
                .await
                .map(|(connection, primary)| (RedisLink::single(connection), primary)),
            Target::Cluster(target) => match target.client.get_async_connection().await {
                Ok(connection) => {
                    let link = RedisLink {
                        kind: LinkKind::Cluster(connection),
                    };
                    Ok((link, inner.endpoint.clone()))
                }
                Err(error) => {
                    let budget = inner.options.connect_timeout;
                    let mut failure = RedisCallError::connect(&inner.endpoint, budget, &error);
                    if let Some(seeds) = target.seed_failures(&inner.config, budget).await {
                        failure.message =
                            format!("{failure} (no seed node could be used: {seeds})");
                    }
                    Err(failure)
                }
            },
        };
        let attempt = match attempt {
            Ok((connection, server)) => self.checked(connection, &server).await,
            Err(error) => Err(error),
        };
        let outcome = match attempt {
            Ok(connection) => {
                let connection = Arc::new(connection);
                inner.current.store(Some(Arc::clone(&connection)));
                *last_error = None;
                Ok(connection)
            }
            Err(error) => {
                *last_error = Some(error.clone());
                Err(error)
            }
        };
        inner.attempts.fetch_add(1, Ordering::Release);
        outcome
    }

    /// Asks the sentinels for the current primary and connects to it, before `deadline` (the
    /// caller's `connect_timeout`): the connection and the primary's address for messages.
    async fn connect_via_sentinel(
        &self,
        target: &SentinelTarget,
        deadline: tokio::time::Instant,
    ) -> Result<(MultiplexedConnection, String), RedisCallError> {
        let after = self.inner.options.connect_timeout;
        let (connection, primary) = target.primary(deadline, after, &self.inner.config).await?;
        tracing::info!(endpoint = self.endpoint(), %primary, "redis connected to the primary named by sentinel");
        Ok((connection, primary))
    }

    /// `connection` (to `server`, as messages name it) if the server's eviction policy is
    /// `noeviction` or cannot be read; a refusal naming the policy otherwise (the connection is
    /// dropped: a later call connects anew and checks again, so a policy fixed meanwhile is
    /// accepted then). Runs within the caller's connect deadline.
    async fn checked(&self, link: RedisLink, server: &str) -> Result<RedisLink, RedisCallError> {
        let mut connection = match link.kind {
            LinkKind::Single(connection) => connection,
            LinkKind::Cluster(connection) => {
                return self.checked_cluster(&connection).await.map(|()| RedisLink {
                    kind: LinkKind::Cluster(connection),
                })
            }
        };
        let reply = ::redis::cmd("INFO")
            .arg("memory")
            .query_async::<String>(&mut connection)
            .await;
        match eviction_policy(reply) {
            Ok(EvictionPolicy::NoEviction) => {
                self.inner.info_refused.store(false, Ordering::Relaxed);
                Ok(RedisLink::single(connection))
            }
            Ok(EvictionPolicy::Evicting(policy)) => {
                Err(RedisCallError::eviction_policy(server, &policy))
            }
            Ok(EvictionPolicy::Unknown(why)) => {
                self.inner.info_refused.store(true, Ordering::Relaxed);
                self.warn_policy_unknown(server, &why);
                Ok(RedisLink::single(connection))
            }
            Err(error) => Err(RedisCallError::connect(
                server,
                self.inner.options.connect_timeout,
                &error,
            )),
        }
    }

    fn warn_policy_unknown(&self, server: &str, why: &str) {
        tracing::warn!(
            endpoint = self.endpoint(),
            server,
            %why,
            "redis eviction policy unknown: INFO memory was refused, so countersign \
             cannot check that the server runs with maxmemory-policy noeviction; any \
             other policy lets a full Redis evict live replay nonces (re-opening the \
             replays they guard), sessions and throttle counters. Grant +info to the \
             ACL user (or make sure of the policy otherwise); using the connection"
        );
    }

    /// The check of a new cluster connection: the cluster's state, then every primary's
    /// identity, version and eviction policy ([`check_cluster`]). Runs within the caller's
    /// connect deadline.
    async fn checked_cluster(&self, connection: &ClusterConnection) -> Result<(), RedisCallError> {
        match check_cluster(connection, true).await {
            Ok(ClusterFinding::Usable { unknown, .. }) => {
                self.inner
                    .info_refused
                    .store(unknown.is_some(), Ordering::Relaxed);
                if let Some((server, why)) = unknown {
                    self.warn_policy_unknown(&server, &why);
                }
                Ok(())
            }
            Ok(finding) => Err(self.cluster_refusal(finding)),
            Err(error) => Err(RedisCallError::connect(
                self.endpoint(),
                self.inner.options.connect_timeout,
                &error,
            )),
        }
    }

    /// The error of a cluster found unusable (an evicting primary, a primary that did not
    /// answer or runs a Redis before 7.0, a cluster not `ok`).
    fn cluster_refusal(&self, finding: ClusterFinding) -> RedisCallError {
        match finding {
            ClusterFinding::Evicting { server, policy } => {
                RedisCallError::eviction_policy(&format!("{server} (a cluster primary)"), &policy)
            }
            ClusterFinding::Unusable(problem) => RedisCallError::new(format!(
                "redis cluster {} is not usable: {problem}",
                self.endpoint()
            )),
            ClusterFinding::Usable { .. } => {
                RedisCallError::new(format!("redis cluster {}: usable", self.endpoint()))
            }
        }
    }

    /// Stops using `dead` (if it is still the connection in use): the next call connects anew.
    fn forget(&self, dead: &Arc<RedisLink>) {
        let _previous = self
            .inner
            .current
            .compare_and_swap(dead, None::<Arc<RedisLink>>);
    }

    /// Runs `call` on the shared connection within the call deadline. `call` may run twice
    /// when the first attempt finds the connection dead (the second on a new connection),
    /// so it must be safe to repeat: the first attempt may have been executed with only its
    /// reply lost, and the second then sees its effect. Every store here is safe: a repeated
    /// write fails closed (a failed login counted twice), or it recognises its own first run
    /// (the replay cache's `SET NX GET` finds the token its first try wrote,
    /// [`RedisReplayCache`]; the proxy's session store: a login finds the session its first
    /// run wrote, a revoke the receipt its first run left, `proxy::session_redis`). A Redis
    /// Cluster connection is not retried here, but the crate's cluster client repeats a call
    /// lost with a node's connection itself, so the same holds there.
    /// It also runs twice when the server refused the first attempt for not being a writable
    /// primary (`READONLY`, `MASTERDOWN`, `LOADING`: see `is_not_primary`); such a refusal
    /// means the first attempt wrote nothing, so the second one is not a repeat.
    pub async fn run<T, F, Fut>(&self, call: F) -> Result<T, RedisCallError>
    where
        F: Fn(RedisLink) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_within(self.inner.options.op_timeout, call).await
    }

    /// [`run`](Self::run) with an explicit call deadline; logs outage transitions.
    async fn run_within<T, F, Fut>(
        &self,
        op_timeout: Duration,
        call: F,
    ) -> Result<T, RedisCallError>
    where
        F: Fn(RedisLink) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let result = self.run_unlogged(op_timeout, call).await;
        self.note_outcome(result.as_ref().err());
        result
    }

    /// The retry logic of every call ([`run`](Self::run)). Logs nothing.
    async fn run_unlogged<T, F, Fut>(
        &self,
        op_timeout: Duration,
        call: F,
    ) -> Result<T, RedisCallError>
    where
        F: Fn(RedisLink) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let connection = self.connection().await?;
        // A cluster connection is never replaced for a failed call: the crate's client
        // reconnects to each node itself and follows redirections, and a new cluster connection
        // would wait for every primary (the check), failing the calls of the live ones too.
        let cluster = connection.is_cluster();
        match self.try_within(op_timeout, &connection, &call).await {
            // The connection was found dead (e.g. Redis restarted or stopped since the last
            // call), or it reaches a server that is no longer the writable primary (a failover
            // behind the same address left it on the demoted server): one more try on a new
            // connection, so the first request after an outage or a failover does not fail
            // needlessly. Repeating is safe: a call refused with READONLY / MASTERDOWN /
            // LOADING was not executed (so a `SET NX` retried this way is its first write, and
            // a nonce is never counted as fresh twice), and a call lost with its connection
            // is safe to repeat (see `run`). Timeouts and other server errors are not
            // retried (a timeout spent the deadline; a server error would repeat), but a
            // timeout drops the connection for the next call (`try_within`).
            //
            // From here the call is one made while disconnected: the new connection is made
            // (or the attempt in progress waited for, and its outcome shared) within
            // `connect_timeout`, like every other caller's, and the second try has its own
            // `op_timeout`. With the reconnection inside the first try's deadline, the caller
            // that found the connection dead would be the one to give up with "timed out"
            // while the attempt it waits for (or the line of callers before it) ends with the
            // real cause, e.g. `Connection refused`, which the callers that came a moment
            // later, with the connect deadline, do get.
            Err(Failure::Redis(e))
                if !cluster && (is_dead_connection(&e) || is_not_primary(&e)) =>
            {
                if is_not_primary(&e) {
                    self.warn_not_primary(&e);
                }
                self.forget(&connection);
                let fresh = self.connection().await?;
                match self.try_within(op_timeout, &fresh, &call).await {
                    Ok(value) => Ok(value),
                    Err(Failure::Redis(e)) => {
                        // Dropped for the next call too: the address may lead to the primary
                        // by then.
                        if is_dead_connection(&e) || is_not_primary(&e) {
                            self.forget(&fresh);
                        }
                        Err(RedisCallError::redis(&e))
                    }
                    Err(Failure::Deadline(error)) => Err(error),
                }
            }
            Err(Failure::Redis(e)) => Err(RedisCallError::redis(&e)),
            Err(Failure::Deadline(error)) => Err(error),
            Ok(value) => Ok(value),
        }
    }

    /// One try of `call` on `connection` within `op_timeout`. A try that gets no answer in
    /// time (the deadline, or the crate's own response timeout) drops the connection (not a
    /// cluster one): it may be dead without having been closed (a host or path that vanished,
    /// a failover behind the same address), and TCP would keep it for many minutes, every call
    /// on it timing out. The next call connects anew instead; calls already sent on this one
    /// still finish on it. A Redis that is merely slow costs one reconnect. Either timeout is
    /// reported as the deadline's (`timed out after N ms`): the crate's own fires at the
    /// connection's `op_timeout`, with a message that names no time.
    async fn try_within<T, F, Fut>(
        &self,
        op_timeout: Duration,
        connection: &Arc<RedisLink>,
        call: &F,
    ) -> Result<T, Failure>
    where
        F: Fn(RedisLink) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let outcome = tokio::time::timeout(op_timeout, call(RedisLink::clone(connection))).await;
        let timed_out = match &outcome {
            Ok(Err(e)) => e.is_timeout(),
            Err(_) => true,
            Ok(Ok(_)) => false,
        };
        if timed_out && !connection.is_cluster() {
            self.forget(connection);
        }
        match outcome {
            Ok(Ok(value)) => Ok(value),
            // The crate's response timeout (the connection's `op_timeout`, from when the
            // command was sent) can fire in the same timer tick as this deadline: the same
            // event, told the same way. Not on a cluster connection, whose timeouts may be a
            // node's reconnection (the crate's words say which).
            Ok(Err(_)) if timed_out && !connection.is_cluster() => Err(Failure::Deadline(
                RedisCallError::timeout("call", op_timeout.min(self.inner.options.op_timeout)),
            )),
            Ok(Err(e)) => Err(Failure::Redis(e)),
            Err(_) => Err(Failure::Deadline(RedisCallError::timeout(
                "call", op_timeout,
            ))),
        }
    }

    /// One warning (at most one per [`NOT_PRIMARY_WARNING_INTERVAL`]) that the connection
    /// reached a server that is not the writable primary and is being replaced.
    fn warn_not_primary(&self, error: &RedisError) {
        let now = Instant::now();
        {
            let mut warned = self
                .inner
                .not_primary_warned
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if matches!(*warned, Some(at) if now.duration_since(at) < NOT_PRIMARY_WARNING_INTERVAL)
            {
                tracing::debug!(endpoint = self.endpoint(), %error, "redis connection still reaches a server that is not the primary; reconnecting");
                return;
            }
            *warned = Some(now);
        }
        tracing::warn!(endpoint = self.endpoint(), %error, "redis connection reaches a server that is not the writable primary (a failover?): reconnecting, and retrying the call once on the new connection");
    }

    /// Whether this connection (and its clones) logs the start and end of an outage (on by
    /// default). Turn it off for a connection made only to check a server once, beside the one
    /// a store uses, when the check reports its own outcome: `countersign run`'s startup check
    /// and `check-config --online` do, so an outage is logged once, by the store's connection.
    pub fn set_outage_log(&self, on: bool) {
        self.inner.log_outages.store(on, Ordering::Relaxed);
    }

    /// Logs the first failure of an outage and the first success after it.
    fn note_outcome(&self, error: Option<&RedisCallError>) {
        let endpoint = self.endpoint();
        let log = self.inner.log_outages.load(Ordering::Relaxed);
        match error {
            Some(error) => {
                if self.inner.healthy.swap(false, Ordering::Relaxed) && log {
                    tracing::error!(endpoint, %error, "redis unavailable: requests that need it are refused (503) until it answers again");
                } else {
                    tracing::debug!(endpoint, %error, "redis still unavailable");
                }
            }
            None => {
                if !self.inner.healthy.swap(true, Ordering::Relaxed) && log {
                    tracing::info!(endpoint, "redis reachable again");
                }
            }
        }
    }

    /// Whether the last call succeeded (no I/O; for metrics and logs, not for readiness).
    pub fn last_call_succeeded(&self) -> bool {
        self.inner.healthy.load(Ordering::Relaxed)
    }

    /// Runs one command.
    pub async fn query<T: FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T, RedisCallError> {
        self.run(|mut connection| async move { cmd.query_async(&mut connection).await })
            .await
    }

    /// The server's `maxmemory-policy` in a phrase for an operator (`check-config --online`
    /// prints it): `noeviction`, the evicting policy, or why it cannot be read. Connecting
    /// already refuses an evicting server; this says what was found on one that passed.
    pub async fn eviction_policy_summary(&self) -> Result<String, RedisCallError> {
        if matches!(self.inner.target, Target::Cluster(_)) {
            let finding = self
                .run(|link| async move { check_link_cluster(link, true).await })
                .await?;
            return match finding {
                ClusterFinding::Usable {
                    primaries,
                    unknown: None,
                } => Ok(format!(
                    "cluster_state:ok, maxmemory-policy noeviction on all {primaries} primaries"
                )),
                ClusterFinding::Usable {
                    primaries,
                    unknown: Some((server, why)),
                } => Ok(format!(
                    "cluster_state:ok, {primaries} primaries, maxmemory-policy not readable on \
                     {server}: {why}"
                )),
                refused => Err(self.cluster_refusal(refused)),
            };
        }
        self.run(|mut connection| async move {
            let mut info = ::redis::cmd("INFO");
            info.arg("memory");
            let reply = info.query_async::<String>(&mut connection).await;
            Ok(match eviction_policy(reply)? {
                EvictionPolicy::NoEviction => "maxmemory-policy noeviction".to_owned(),
                EvictionPolicy::Evicting(policy) => {
                    format!("maxmemory-policy {policy} (may evict countersign's keys)")
                }
                EvictionPolicy::Unknown(why) => format!("maxmemory-policy not readable: {why}"),
            })
        })
        .await
    }

    /// Runs a pipeline (one round trip; atomic if built with `.atomic()`).
    pub async fn query_pipe<T: FromRedisValue>(
        &self,
        pipe: &::redis::Pipeline,
    ) -> Result<T, RedisCallError> {
        self.run(|mut connection| async move { pipe.query_async(&mut connection).await })
            .await
    }

    /// Readiness, within the ping deadline: true if Redis answers `PONG`, is not a replica and
    /// runs Redis 7.0 or later. On a Redis Cluster: true if the cluster reports
    /// `cluster_state:ok` and every primary of `CLUSTER SLOTS` answers, as itself, runs 7.0
    /// or later (its `HELLO`, as below) and has `maxmemory-policy noeviction` (an evicting one
    /// drops the connection, as below). With the `PING` goes a `HELLO` (no arguments: the
    /// connection is unchanged), pipelined on the same connection so it costs no extra round
    /// trip, whose `role` says whether the server is the primary (a replica answers `PING`
    /// but refuses every write) and whose `version` whether it is older than 7.0 (which
    /// answers `PING` too, but refuses the stores' calls as syntax errors). A server that
    /// refuses `HELLO` (Redis 6.0 and 6.1 without arguments, Redis before 6.0 as an unknown
    /// command; a proxy; the command renamed away; ACLs cannot refuse it) is asked `INFO
    /// server` next, one more round trip only then, and judged by its `redis_version`; one
    /// that refuses that too is judged by the `PING` alone. Like every call, it retries once on a
    /// connection found dead or reaching a replica, so readiness does not flap after a Redis
    /// restart and comes back by itself after a failover behind the same address, and it logs
    /// the start and end of an outage even when no request comes in.
    ///
    /// It also reads the eviction policy (`INFO memory`, in the same round trip; not sent when
    /// the server refused `INFO` on this connection): a policy changed at runtime to one that
    /// may evict makes the process not ready, and the connection is dropped, so calls fail
    /// closed from then on (each new connection is checked) until the policy is `noeviction`
    /// again. Between two readiness checks an open connection is not re-checked.
    ///
    /// A check that gets no answer within `ping_timeout` drops the connection, as a call that
    /// times out does (`try_within`), and the next call or check connects anew: calls already
    /// sent on it still finish on it, and the proxy sets `ping_timeout` to its call deadline
    /// (`redis_timeout`), so it takes as long a silence as a call would.
    /// [`readiness`](Self::readiness) says why a check failed.
    pub async fn ping(&self) -> bool {
        self.readiness().await.is_ok()
    }

    /// [`ping`](Self::ping), with the reason when not ready: e.g. `redis call timed out after
    /// 500 ms` ([`RedisCallError::is_timeout`]), a replica, an evicting policy. For operator
    /// checks (`check-config --online`) that report what failed.
    pub async fn readiness(&self) -> Result<(), RedisCallError> {
        if matches!(self.inner.target, Target::Cluster(_)) {
            return self.readiness_cluster().await;
        }
        // Dropping the connection on a timeout (in `try_within`) is kept for the readiness
        // check too: a process that is not ready gets no requests from its balancer, so this
        // check may be the only call that can find out that its connection went silent without
        // being closed (a vanished host, a failover behind the same address). Left in place,
        // it would time out every check until the kernel gave up on it, often 15 minutes or
        // more, and readiness would not come back by itself when Redis did. It costs one
        // reconnect, and no call: those already sent on it still finish on it.
        let ping_timeout = self.inner.options.ping_timeout;
        let ping = ::redis::cmd("PING");
        let hello = ::redis::cmd("HELLO");
        let mut info = ::redis::cmd("INFO");
        info.arg("memory");
        let read_policy = !self.inner.info_refused.load(Ordering::Relaxed);
        let reply = self
            .run_unlogged(ping_timeout, |connection| {
                let (ping, hello, info) = (&ping, &hello, &info);
                async move {
                    let mut for_hello = connection.clone();
                    let mut for_info = connection.clone();
                    let mut for_ping = connection;
                    let (pong, role, policy) = tokio::join!(
                        ping.query_async::<String>(&mut for_ping),
                        hello.query_async::<Value>(&mut for_hello),
                        async {
                            if read_policy {
                                Some(info.query_async::<String>(&mut for_info).await)
                            } else {
                                None
                            }
                        },
                    );
                    let pong = pong?;
                    let version = server_version(&role, async {
                        ::redis::cmd("INFO")
                            .arg("server")
                            .query_async::<String>(&mut for_hello)
                            .await
                    })
                    .await;
                    if let Some(why) = version.and_then(too_old_version) {
                        return Err(RedisError::from((
                            ErrorKind::ClientError,
                            "redis server too old",
                            why,
                        )));
                    }
                    if matches!(&role, Ok(hello) if hello_says_replica(hello)) {
                        return Err(RedisError::from((
                            ErrorKind::ReadOnly,
                            "connected to a replica, not the writable primary",
                            "HELLO answered role: replica".to_owned(),
                        )));
                    }
                    // Only a policy read is acted on here; a refused or failed INFO leaves the
                    // judgement to the connection check (which warned about it).
                    let evicting = match policy.map(eviction_policy) {
                        Some(Ok(EvictionPolicy::Evicting(policy))) => Some(policy),
                        Some(Ok(EvictionPolicy::Unknown(_))) => {
                            // Refused since the connection was checked (an ACL changed): stop
                            // asking on this connection.
                            self.inner.info_refused.store(true, Ordering::Relaxed);
                            None
                        }
                        _ => None,
                    };
                    Ok((pong, evicting))
                }
            })
            .await;
        let reply = match reply {
            Ok((_, Some(policy))) => {
                // Whatever connection is in use now leads to that server: drop it, so the
                // calls fail closed (a new connection is checked) instead of writing there.
                self.inner.current.store(None::<Arc<RedisLink>>);
                Err(RedisCallError::eviction_policy(self.endpoint(), &policy))
            }
            Ok((pong, None)) if pong == "PONG" => Ok(()),
            Ok((pong, None)) => {
                let pong: String = pong.chars().filter(|c| !c.is_control()).take(64).collect();
                Err(RedisCallError::new(format!(
                    "redis answered PING with {pong:?}, not PONG"
                )))
            }
            Err(error) => Err(error),
        };
        self.note_outcome(reply.as_ref().err());
        reply
    }
}

impl RedisConnection {
    /// [`readiness`](Self::readiness) on a cluster connection: [`check_cluster`] within the
    /// ping deadline.
    async fn readiness_cluster(&self) -> Result<(), RedisCallError> {
        let read_policy = !self.inner.info_refused.load(Ordering::Relaxed);
        let reply = self
            .run_unlogged(self.inner.options.ping_timeout, |link| async move {
                check_link_cluster(link, read_policy).await
            })
            .await;
        let result = match reply {
            Ok(ClusterFinding::Usable { unknown, .. }) => {
                if unknown.is_some() && read_policy {
                    self.inner.info_refused.store(true, Ordering::Relaxed);
                }
                Ok(())
            }
            Ok(finding) => {
                if matches!(finding, ClusterFinding::Evicting { .. }) {
                    // Calls fail closed from now on: a new connection is checked.
                    self.inner.current.store(None::<Arc<RedisLink>>);
                }
                Err(self.cluster_refusal(finding))
            }
            Err(error) => Err(error),
        };
        self.note_outcome(result.as_ref().err());
        result
    }
}

/// What [`check_cluster`] found.
#[derive(Debug)]
enum ClusterFinding {
    /// Every primary answered with `noeviction` (or, `unknown`, one refused `INFO`: the first
    /// such primary and the reason).
    Usable {
        primaries: usize,
        unknown: Option<(String, String)>,
    },
    /// A primary (its address) runs with an evicting policy.
    Evicting { server: String, policy: String },
    /// The cluster is not `ok`, or a primary did not answer (as itself) or is too old: why,
    /// in words.
    Unusable(String),
}

/// One primary of a cluster, as `CLUSTER SLOTS` names it: its address (for messages), node
/// id, and a slot it serves (to route commands to it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClusterPrimary {
    address: String,
    /// The host and port `CLUSTER SLOTS` gives (to ask the node at its address).
    host: String,
    port: u16,
    id: String,
    slot: u16,
}

/// [`check_cluster`] on a link (an error on a link that is not to a cluster).
async fn check_link_cluster(
    link: RedisLink,
    read_policy: bool,
) -> Result<ClusterFinding, RedisError> {
    match link.kind {
        LinkKind::Cluster(connection) => check_cluster(&connection, read_policy).await,
        LinkKind::Single(_) => Err(RedisError::from((
            ErrorKind::ClientError,
            "not a cluster connection",
        ))),
    }
}

/// The cluster's state (`CLUSTER INFO` from any node: `cluster_state:ok`, every slot served),
/// then every primary of `CLUSTER SLOTS`, asked at once, each by a slot it serves
/// ([`check_primary`]): `CLUSTER MYID` (the answer must come from that primary: the crate
/// sends a command for a primary it cannot reach to another node), `HELLO` (its version: a
/// cluster is as old as its oldest primary, whose slots' calls fail) and, with `read_policy`,
/// `INFO memory`. Not `INFO` routed to "all primaries": the crate leaves out the primaries it
/// has no connection to.
async fn check_cluster(
    connection: &ClusterConnection,
    read_policy: bool,
) -> Result<ClusterFinding, RedisError> {
    let mut any = connection.clone();
    let info: String = ::redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut any)
        .await?;
    let state = info.lines().find_map(|line| {
        line.trim()
            .strip_prefix("cluster_state:")
            .map(|state| state.trim().to_owned())
    });
    if state.as_deref() != Some("ok") {
        return Ok(ClusterFinding::Unusable(format!(
            "the cluster reports cluster_state:{} (some hash slots are not served: a primary \
             down with no replica to take over, or a cluster not fully set up)",
            state.as_deref().unwrap_or("unknown")
        )));
    }
    let slots: Value = ::redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut any)
        .await?;
    let primaries = primaries_from_slots(&slots);
    if primaries.is_empty() {
        return Ok(ClusterFinding::Unusable(
            "CLUSTER SLOTS names no primary".to_owned(),
        ));
    }
    let count = primaries.len();
    let mut checks = tokio::task::JoinSet::new();
    for primary in primaries {
        let connection = connection.clone();
        checks.spawn(async move {
            let by_slot =
                SingleNodeRoutingInfo::SpecificNode(Route::new(primary.slot, SlotAddr::Master));
            let outcome =
                match check_primary(connection.clone(), &primary, read_policy, by_slot).await {
                    // The crate's slot map still names the node that served the slot before a
                    // failover (it is brought up to date only by a MOVED answer to a keyed
                    // command, and readiness sends none: a proxy that no balancer sends traffic
                    // to while not ready would stay not ready for ever). Keyed traffic follows
                    // the MOVED to the new primary, so the primary is asked at its own address:
                    // answering there, as itself, it is usable.
                    Err(PrimaryProblem::AnotherNode(problem)) => {
                        let by_address = SingleNodeRoutingInfo::ByAddress {
                            host: primary.host.clone(),
                            port: primary.port,
                        };
                        check_primary(connection, &primary, read_policy, by_address)
                            .await
                            .map_err(|e| format!("{problem}; asked at its address: {e}"))
                    }
                    other => other.map_err(|e| e.to_string()),
                };
            (primary, outcome)
        });
    }
    let mut outcomes = Vec::with_capacity(count);
    while let Some(joined) = checks.join_next().await {
        match joined {
            Ok(outcome) => outcomes.push(outcome),
            Err(error) => {
                return Ok(ClusterFinding::Unusable(format!(
                    "a primary's check did not finish: {error}"
                )))
            }
        }
    }
    outcomes.sort_by(|a, b| a.0.address.cmp(&b.0.address));
    let mut unknown = None;
    let mut problems = Vec::new();
    for (primary, outcome) in outcomes {
        match outcome {
            Ok(EvictionPolicy::NoEviction) => {}
            Ok(EvictionPolicy::Evicting(policy)) => {
                return Ok(ClusterFinding::Evicting {
                    server: primary.address,
                    policy,
                })
            }
            Ok(EvictionPolicy::Unknown(why)) => {
                unknown.get_or_insert((primary.address, why));
            }
            Err(problem) => problems.push(format!("primary {}: {problem}", primary.address)),
        }
    }
    if !problems.is_empty() {
        return Ok(ClusterFinding::Unusable(problems.join("; ")));
    }
    Ok(ClusterFinding::Usable {
        primaries: count,
        unknown,
    })
}

/// One primary checked ([`check_cluster`]): its eviction policy (`Unknown` when not asked or
/// refused), or why it cannot be used: no answer, another node answered for it, or it runs a
/// Redis before 7.0 (its `HELLO` says so, or, when it refuses `HELLO`, its `INFO server`, asked
/// then; one that refuses both is not judged by them, as on a single server). `CLUSTER MYID`,
/// `HELLO` and, with `read_policy`, `INFO memory` go
/// in one pipeline: one round trip, answered by one node, so the version and policy read are
/// those of the node whose identity was checked. After a refusal they are asked again one by
/// one on the same route (the same node, unless the slot map changes in between).
async fn check_primary(
    mut connection: ClusterConnection,
    primary: &ClusterPrimary,
    read_policy: bool,
    route: SingleNodeRoutingInfo,
) -> Result<EvictionPolicy, PrimaryProblem> {
    let mut myid = ::redis::cmd("CLUSTER");
    myid.arg("MYID");
    let hello = ::redis::cmd("HELLO");
    let mut info = ::redis::cmd("INFO");
    info.arg("memory");
    let mut pipe = ::redis::pipe();
    pipe.add_command(myid.clone()).add_command(hello.clone());
    if read_policy {
        pipe.add_command(info.clone());
    }
    let count = if read_policy { 3 } else { 2 };
    let incomplete = || PrimaryProblem::Other("an incomplete answer".to_owned());
    let (id, hello, policy) = match connection
        .route_pipeline(&pipe, 0, count, route.clone())
        .await
    {
        Ok(replies) => {
            let mut replies = replies.into_iter();
            let (Some(id), Some(hello)) = (replies.next(), replies.next()) else {
                return Err(incomplete());
            };
            let policy = match (read_policy, replies.next()) {
                (false, _) => None,
                (true, Some(info)) => Some(Ok(info)),
                (true, None) => return Err(incomplete()),
            };
            (id, Ok(hello), policy)
        }
        // A refusal: the node is up, but the crate fails a whole pipeline for one error reply,
        // so which command was refused (INFO not allowed to the ACL user, HELLO unknown before
        // Redis 6.2 or renamed away) and what the others answered is not known. Each is asked
        // again on its own, all at once (one more round trip, only after a refusal), so each
        // refusal is judged alone: a refused HELLO does not cost the policy check.
        Err(error) if refused(&error) => {
            let routing = || ::redis::cluster_routing::RoutingInfo::SingleNode(route.clone());
            let (mut for_hello, mut for_info) = (connection.clone(), connection.clone());
            let (id, hello, policy) = tokio::join!(
                connection.route_command(&myid, routing()),
                for_hello.route_command(&hello, routing()),
                async {
                    if read_policy {
                        Some(for_info.route_command(&info, routing()).await)
                    } else {
                        None
                    }
                },
            );
            let id = id.map_err(|e| {
                PrimaryProblem::Other(format!(
                    "CLUSTER MYID failed: {}",
                    RedisCallError::redis(&e)
                ))
            })?;
            (id, hello, policy)
        }
        Err(error) => {
            return Err(PrimaryProblem::Other(format!(
                "no answer: {}",
                RedisCallError::redis(&error)
            )))
        }
    };
    // The identity first: what another node says of itself is not this primary's.
    match value_text(&id) {
        Some(id) if id == primary.id => {}
        Some(id) => {
            return Err(PrimaryProblem::AnotherNode(format!(
                "another node ({id}) answered for it: it is down or unreachable"
            )))
        }
        None => {
            return Err(PrimaryProblem::Other(
                "CLUSTER MYID gave no node id".to_owned(),
            ))
        }
    }
    // Same node, same route: a node that refused HELLO is asked its version there.
    let version = server_version(&hello, async {
        let mut info_server = ::redis::cmd("INFO");
        info_server.arg("server");
        let routing = ::redis::cluster_routing::RoutingInfo::SingleNode(route);
        connection
            .route_command(&info_server, routing)
            .await
            .and_then(|info| String::from_redis_value(&info))
    })
    .await;
    if let Some(why) = version.and_then(too_old_version) {
        return Err(PrimaryProblem::Other(why));
    }
    match policy {
        None => Ok(EvictionPolicy::Unknown(
            "INFO was refused before: not asked".to_owned(),
        )),
        Some(info) => eviction_policy(info.and_then(|info| String::from_redis_value(&info)))
            .map_err(|e| PrimaryProblem::Other(e.to_string())),
    }
}

/// Why a primary could not be used ([`check_primary`]).
#[derive(Debug)]
enum PrimaryProblem {
    /// Another node answered on the route asked: the crate routed the command elsewhere.
    AnotherNode(String),
    /// No answer, or not a usable one.
    Other(String),
}

impl fmt::Display for PrimaryProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrimaryProblem::AnotherNode(text) | PrimaryProblem::Other(text) => f.write_str(text),
        }
    }
}

/// Text of a bulk, simple or verbatim string reply.
fn value_text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// The primaries of a `CLUSTER SLOTS` reply (`[[start, end, [host, port, id, ..], replicas..],
/// ..]`), one per node id with the first slot of its first range, sorted by address.
fn primaries_from_slots(slots: &Value) -> Vec<ClusterPrimary> {
    let Value::Array(ranges) = slots else {
        return Vec::new();
    };
    let mut primaries: Vec<ClusterPrimary> = Vec::new();
    for range in ranges {
        let Value::Array(items) = range else {
            continue;
        };
        let Some(slot) = items.first().and_then(|start| match start {
            Value::Int(start) => u16::try_from(*start).ok(),
            _ => None,
        }) else {
            continue;
        };
        let Some(Value::Array(node)) = items.get(2) else {
            continue;
        };
        let host = node.first().and_then(value_text).unwrap_or_default();
        let port = match node.get(1) {
            Some(Value::Int(port)) => *port,
            _ => 0,
        };
        let Some(id) = node.get(2).and_then(value_text) else {
            continue;
        };
        if primaries.iter().any(|primary| primary.id == id) {
            continue;
        }
        let address = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        primaries.push(ClusterPrimary {
            address,
            host,
            port: u16::try_from(port).unwrap_or(0),
            id,
            slot,
        });
    }
    primaries.sort_by(|a, b| a.address.cmp(&b.address));
    primaries
}

/// Whether `pem` holds at least one PEM certificate block (an empty trust store would refuse
/// every server, as late as the first request).
fn has_pem_certificate(pem: &[u8]) -> bool {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    pem.windows(BEGIN.len()).any(|w| w == BEGIN)
}

/// Whether `error` means the connection itself is gone (worth one retry on a new one).
fn is_dead_connection(error: &RedisError) -> bool {
    error.is_connection_dropped()
        || (error.is_unrecoverable_error() && !error.is_timeout() && !error.is_connection_refusal())
}

/// Whether `error` is the server refusing the call for not being a writable primary: a replica
/// (`READONLY`), a replica that lost its primary (`MASTERDOWN`), a server loading its data set
/// (`LOADING`, e.g. a demoted primary resynchronising). The command was not executed. Behind
/// an address that follows failover, a new connection reaches the new primary, so the
/// connection is replaced (worth one retry on a new one, like a dead connection).
fn is_not_primary(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ReadOnly | ErrorKind::MasterDown | ErrorKind::BusyLoadingError
    )
}

/// How one try of a call failed ([`RedisConnection::try_within`]).
enum Failure {
    /// The server or the connection answered with this error.
    Redis(RedisError),
    /// No answer within the call deadline.
    Deadline(RedisCallError),
}

/// The `maxmemory-policy` of a server, as its `INFO memory` reply tells it.
#[derive(Debug, PartialEq, Eq)]
enum EvictionPolicy {
    /// `noeviction`: a full Redis refuses writes (countersign answers 503) and drops nothing.
    NoEviction,
    /// Any other policy (`allkeys-*`, `volatile-*`, or one this code does not know): a full
    /// Redis may drop countersign's keys, which all have a time to live.
    Evicting(String),
    /// Not known: `INFO` refused (an ACL without it, the command renamed away), or a reply
    /// without the field (a proxy, another server); the reason.
    Unknown(String),
}

/// The eviction policy from the reply to `INFO memory`; an error when the call itself failed
/// (connection lost, no answer), which fails the connection like any connection error.
fn eviction_policy(reply: Result<String, RedisError>) -> Result<EvictionPolicy, RedisError> {
    let text = match reply {
        Ok(text) => text,
        // The server answered with an error (`NOPERM`, `ERR unknown command`), or with
        // something that is not text: it is up, only its policy cannot be read.
        Err(error) if refused(&error) || error.kind() == ErrorKind::TypeError => {
            return Ok(EvictionPolicy::Unknown(error.to_string()));
        }
        Err(error) => return Err(error),
    };
    let policy = text.lines().find_map(|line| {
        line.trim()
            .strip_prefix("maxmemory_policy:")
            .map(|value| value.trim().to_owned())
    });
    Ok(match policy {
        Some(policy) if policy == "noeviction" => EvictionPolicy::NoEviction,
        Some(policy) => EvictionPolicy::Evicting(policy),
        None => EvictionPolicy::Unknown("the INFO memory reply has no maxmemory_policy".to_owned()),
    })
}

/// The instant `after` from now. `Instant + Duration` panics on overflow, and `RedisOptions`
/// takes any duration (`Duration::MAX` for "no limit"): one too long to represent ends about
/// 30 years from now instead, as `tokio::time::timeout` does with such a duration.
fn deadline_after(after: Duration) -> tokio::time::Instant {
    const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 86_400);
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// The text values of the fields named `name` in a `HELLO` reply (a map in RESP3, a flat list
/// of names and values in RESP2).
fn hello_field<'a>(hello: &'a Value, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    fn text(value: &Value) -> Option<&[u8]> {
        match value {
            Value::BulkString(bytes) => Some(bytes),
            Value::SimpleString(text) => Some(text.as_bytes()),
            _ => None,
        }
    }
    let pairs: Box<dyn Iterator<Item = (&Value, &Value)>> = match hello {
        Value::Map(fields) => Box::new(fields.iter().map(|(name, value)| (name, value))),
        Value::Array(items) => Box::new(items.chunks_exact(2).map(|pair| (&pair[0], &pair[1]))),
        _ => Box::new(std::iter::empty()),
    };
    pairs
        .filter(move |(field, _)| text(field) == Some(name))
        .filter_map(|(_, value)| text(value))
}

/// The server's version (major, minor) from a `HELLO` reply, if it names one that parses.
fn hello_version(hello: &Value) -> Option<(u32, u32)> {
    hello_field(hello, b"version").find_map(parse_version)
}

/// `major.minor[.patch]` as (major, minor); a missing minor is 0.
fn parse_version(version: &[u8]) -> Option<(u32, u32)> {
    let mut parts = std::str::from_utf8(version).ok()?.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

/// Whether a call failed because the server refused the command (an error reply: unknown
/// command, wrong arguments, `NOPERM`), as opposed to no answer.
fn refused(error: &RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ResponseError | ErrorKind::ExtensionError
    )
}

/// The server's version (major, minor): from its `HELLO` reply, or, when it refused `HELLO`
/// (Redis 6.0 and 6.1 without arguments, before 6.0 an unknown command), from `info_server`,
/// an `INFO server` call that runs only then (one more round trip, for such a server only).
/// None when neither names a version that parses: such a server is not judged by it.
async fn server_version(
    hello: &Result<Value, RedisError>,
    info_server: impl Future<Output = Result<String, RedisError>>,
) -> Option<(u32, u32)> {
    match hello {
        Ok(hello) => hello_version(hello),
        Err(error) if refused(error) => info_server_version(info_server.await),
        Err(_) => None,
    }
}

/// The server's version from an `INFO server` reply (its `redis_version:` line), for a server
/// that refused `HELLO`; None when the call failed or names no version that parses.
fn info_server_version(info: Result<String, RedisError>) -> Option<(u32, u32)> {
    info.ok()?
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .and_then(|version| parse_version(version.as_bytes()))
}

/// Why the server of a `HELLO` reply cannot be used ([`too_old_version`] of its version).
#[cfg(test)]
fn too_old(hello: &Value) -> Option<String> {
    hello_version(hello).and_then(too_old_version)
}

/// Why a server of this version cannot be used, when it is before 7.0: every store here needs
/// 7.0 (the replay cache's `SET .. NX GET`, the login throttle's `EXPIRE .. NX`), and an older
/// server answers everything else but refuses those calls as syntax errors.
fn too_old_version((major, minor): (u32, u32)) -> Option<String> {
    (major < 7).then(|| {
        format!(
            "it runs Redis {major}.{minor}: countersign needs 7.0 or later (SET .. NX GET, \
             EXPIRE .. NX)"
        )
    })
}

/// Whether a `HELLO` reply says `role: replica`.
fn hello_says_replica(hello: &Value) -> bool {
    hello_field(hello, b"role").any(|role| matches!(role, b"replica" | b"slave"))
}

/// Default key prefix of [`RedisReplayCache`].
pub const DEFAULT_REPLAY_PREFIX: &str = "countersign:nonce:";

/// A [`ReplayCache`] in Redis, shared by every API process that uses the same Redis and
/// prefix: a nonce accepted by one process is a replay for all of them.
///
/// Each check is one `SET <prefix><nonce> <token> NX GET PX <ttl>` (Redis 7.0 or later): atomic
/// in Redis, so concurrent requests with one nonce get exactly one `Fresh`. `<token>` is 16
/// random bytes of this check's own, and `GET` answers the value already there: a check whose
/// first try was lost with its connection (the command may have reached Redis with only its
/// reply lost) and is repeated, by [`RedisConnection::run`] on a new connection or by the
/// crate's cluster client on a Redis Cluster, finds its own token and is `Fresh`, not a replay
/// of itself; any other value is another request's use, `Replayed`. The time to live is
/// computed from the caller's `expires_at - now` (at least one second), not from an absolute
/// `EXAT`, so a clock difference between the API host and the Redis host cannot shorten it.
/// Redis errors and timeouts are errors (the verify layer answers 503
/// `replay_cache_unavailable`). Entries are never evicted early by this cache (configure Redis
/// with `maxmemory-policy noeviction` so Redis itself refuses writes rather than evicting live
/// nonces when full).
///
/// Wall-clock steps backwards: Redis expires a key after its time to live whatever the API
/// host's clock does afterwards, so once that clock steps back, a request captured before the
/// step can be acceptable again while Redis has already dropped its key. The cache remembers
/// the latest `now` it was called with (shared by its clones), and refuses with an error (the
/// verify layer answers 503 `replay_cache_unavailable`, fail closed) a nonce whose expiry is at
/// or before that while the caller's `now` is still before it: its key may be gone, so a replay
/// cannot be told from a first use. The refusals end by themselves once the clock is past the
/// mark again. A mark only one second ahead of the caller's `now` is no step (a request of the
/// next second got there first): that nonce's window has closed, and it is refused with
/// [`ReplayError::expired`] (the verify layer answers 401 `expired`). Not covered: a host that saw no request between the nonce's expiry and the step
/// (the mark never got there), each host of a fleet keeping its own mark, and steps of the
/// Redis host's own clock (docs/OPERATIONS.md, Clocks).
#[derive(Debug, Clone)]
pub struct RedisReplayCache {
    connection: RedisConnection,
    prefix: String,
    /// The latest `now` (unix seconds) any clone of this cache was called with. Shared by the
    /// clones because they are one process under one clock: a layer that saw the later time
    /// protects the others after a step back.
    latest_now: Arc<AtomicU64>,
}

impl RedisReplayCache {
    /// A cache on `connection` with keys `<prefix><nonce>`.
    pub fn new(connection: RedisConnection, prefix: impl Into<String>) -> Self {
        RedisReplayCache {
            connection,
            prefix: prefix.into(),
            latest_now: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A cache on a new connection to `url` with the default prefix and timeouts.
    pub fn open(url: &str) -> Result<Self, RedisUrlError> {
        Ok(Self::new(
            RedisConnection::open(url)?,
            DEFAULT_REPLAY_PREFIX,
        ))
    }

    /// The connection (to share it with other Redis stores of the process).
    pub fn connection(&self) -> &RedisConnection {
        &self.connection
    }

    async fn check(
        &self,
        nonce: &str,
        expires_at: u64,
        now: u64,
    ) -> Result<ReplayOutcome, ReplayError> {
        // A key lives `expires_at - now` seconds of Redis' time from when it is written, and
        // Redis drops it then whatever this host's clock does. After this host's clock stepped
        // back, a signature captured before the step is acceptable again (its `created` is
        // back within the window) while its key may already be gone: this cache saw a `now`
        // at or past the nonce's expiry before the step. Such a nonce cannot be vouched for,
        // so it is refused (fail closed) until the clock is past the mark again. An
        // `expires_at` the caller itself sees as passed is not a clock step: it is recorded
        // for a second below, as before. (A mark only one second ahead is a request of the
        // next second recorded first, refused `expired`: see `clock_went_back`.) The mark
        // only moves forward: one load per request, and a write only when the caller's clock
        // is ahead of it (about once a second).
        let mut latest_now = self.latest_now.load(Ordering::Relaxed);
        if now > latest_now {
            latest_now = self.latest_now.fetch_max(now, Ordering::Relaxed).max(now);
        }
        if expires_at <= latest_now && now < expires_at {
            return Err(clock_went_back(expires_at, now, latest_now));
        }
        // One second more than `expires_at - now`: `now` is whole seconds, so the key is
        // written up to a second after the `now` it was computed from, and a host of the
        // fleet whose clock lags this one by a fraction of a second (any NTP offset) accepts
        // the signature until that much later. Without it, such a host took a capture for
        // fresh in that last fraction of a second.
        let ttl_ms = expires_at
            .saturating_sub(now)
            .max(1)
            .saturating_add(1)
            .saturating_mul(1000);
        let mut key = String::with_capacity(self.prefix.len() + nonce.len());
        key.push_str(&self.prefix);
        key.push_str(nonce);
        // This check's own value. A repeated try (its first lost with the connection, maybe
        // after Redis executed it) sends the same command, so it finds this token if the lost
        // try wrote it: its own use, not a replay. Without it, that retry's "already recorded"
        // could not be told from a replay, and a legitimate first request was refused.
        let token: [u8; 16] = rand::random();
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(&key)
            .arg(&token[..])
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(ttl_ms);
        // `SET NX GET` answers nil when it wrote the key, and the value it kept otherwise.
        let recorded: Option<Vec<u8>> = self.connection.query(&cmd).await.map_err(|e| {
            let error = e.to_string();
            if error.contains("syntax error") {
                // What a server before 7.0 answers to `SET .. NX GET`.
                ReplayError::new(format!(
                    "{error}: redis refused SET .. NX GET; the replay cache needs Redis 7.0 or \
                     later"
                ))
            } else {
                ReplayError::new(error)
            }
        })?;
        Ok(match recorded {
            None => ReplayOutcome::Fresh,
            Some(value) if value == token => {
                tracing::debug!(
                    "replay cache: a retried SET NX found its own lost first try's token: \
                     the nonce's first use"
                );
                ReplayOutcome::Fresh
            }
            Some(_) => ReplayOutcome::Replayed,
        })
    }
}

/// The refusal of a nonce whose expiry the cache's mark (the latest `now` it saw) has already
/// passed while the caller's clock has not: Redis may have expired its key. The same words as
/// the memory cache's, so one alert or log search finds both. A mark one second ahead of the
/// caller's clock (so at the nonce's expiry exactly) needs no step back: the mark is one per
/// process, and any request of the next second, read a moment later, got there first. The
/// nonce's window has closed by the time it is answered: `expired`, without a warning that the
/// clock went back (the memory cache's words again).
fn clock_went_back(expires_at: u64, now: u64, latest_now: u64) -> ReplayError {
    if latest_now <= now.saturating_add(1) {
        return ReplayError::expired(format!(
            "the signature's window closed (at {expires_at}) before its nonce was recorded: \
             the replay cache had already recorded a request of {latest_now} (now {now})"
        ));
    }
    ReplayError::new(format!(
        "the clock went back: this nonce expires at {expires_at}, and the replay cache already \
         saw {latest_now} (now {now}), so Redis may have expired its key; refusing until the \
         clock is past {latest_now} (docs/OPERATIONS.md, Clocks)"
    ))
}

impl ReplayCache for RedisReplayCache {
    fn check_and_record<'a>(
        &'a self,
        nonce: &'a str,
        expires_at: u64,
        now: u64,
    ) -> ReplayFuture<'a, Result<ReplayOutcome, ReplayError>> {
        Box::pin(self.check(nonce, expires_at, now))
    }

    fn ready(&self) -> ReplayFuture<'_, bool> {
        Box::pin(self.connection.ping())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Value {
        Value::BulkString(text.as_bytes().to_vec())
    }

    /// The version a `HELLO` reply names, in both protocols; none when absent or not a number.
    #[test]
    fn hello_version_in_both_protocols() {
        let fields = |version: &str| {
            vec![
                bulk("server"),
                bulk("redis"),
                bulk("version"),
                bulk(version),
            ]
        };
        assert_eq!(hello_version(&Value::Array(fields("7.0.15"))), Some((7, 0)));
        assert_eq!(hello_version(&Value::Array(fields("6.2.14"))), Some((6, 2)));
        assert_eq!(hello_version(&Value::Array(fields("8"))), Some((8, 0)));
        assert_eq!(hello_version(&Value::Array(fields("x.y"))), None);
        let map = Value::Map(vec![
            (bulk("server"), bulk("redis")),
            (bulk("version"), Value::SimpleString("6.0.9".into())),
        ]);
        assert_eq!(hello_version(&map), Some((6, 0)));
        assert_eq!(hello_version(&Value::Nil), None);
        assert_eq!(
            hello_version(&Value::Array(vec![bulk("server"), bulk("redis")])),
            None
        );
    }

    /// A version before 7.0 is refused in the one wording of both the single-server and the
    /// cluster check; 7.0 and later, or no version that parses, is not.
    #[test]
    fn a_hello_before_7_is_too_old() {
        let hello = |version: &str| Value::Array(vec![bulk("version"), bulk(version)]);
        assert_eq!(
            too_old(&hello("6.2.14")).as_deref(),
            Some("it runs Redis 6.2: countersign needs 7.0 or later (SET .. NX GET, EXPIRE .. NX)")
        );
        let resp3 = Value::Map(vec![(bulk("version"), bulk("5.0.7"))]);
        assert!(too_old(&resp3).is_some_and(|why| why.starts_with("it runs Redis 5.0:")));
        for version in ["7.0.0", "7.2.4", "8.0.1", "10"] {
            assert_eq!(too_old(&hello(version)), None, "{version}");
        }
        assert_eq!(too_old(&hello("unknown")), None);
        assert_eq!(too_old(&Value::Nil), None);
    }

    /// A server that refused `HELLO` is judged by `INFO server`'s `redis_version:` line, as
    /// Redis 5.0 and 6.0 write it (CRLF line ends); a refused `INFO` or one without the line
    /// judges nothing.
    #[test]
    fn info_server_names_the_version_of_a_server_that_refused_hello() {
        let info = "# Server\r\nredis_version:5.0.6\r\nredis_git_sha1:00000000\r\n\
                    redis_mode:standalone\r\n";
        assert_eq!(info_server_version(Ok(info.to_owned())), Some((5, 0)));
        assert_eq!(
            info_server_version(Ok(info.to_owned())).and_then(too_old_version),
            Some(
                "it runs Redis 5.0: countersign needs 7.0 or later (SET .. NX GET, EXPIRE .. NX)"
                    .to_owned()
            )
        );
        let seven = "# Server\r\nredis_version:7.0.15\r\n".to_owned();
        assert_eq!(
            info_server_version(Ok(seven)).and_then(too_old_version),
            None
        );
        assert_eq!(info_server_version(Ok("# Server\r\n".to_owned())), None);
        let no_permission = RedisError::from((
            ErrorKind::ResponseError,
            "An error was signalled by the server",
            "NOPERM this user has no permissions to run the 'info' command".to_owned(),
        ));
        assert!(refused(&no_permission));
        assert_eq!(info_server_version(Err(no_permission)), None);
    }

    #[test]
    fn hello_role_in_both_protocols() {
        let resp2 = |role: &str| {
            Value::Array(vec![
                bulk("server"),
                bulk("redis"),
                bulk("proto"),
                Value::Int(2),
                bulk("role"),
                bulk(role),
                bulk("modules"),
                Value::Array(vec![]),
            ])
        };
        assert!(hello_says_replica(&resp2("replica")));
        assert!(!hello_says_replica(&resp2("master")));
        let resp3 = |role: &str| {
            Value::Map(vec![
                (bulk("proto"), Value::Int(3)),
                (bulk("role"), bulk(role)),
            ])
        };
        assert!(hello_says_replica(&resp3("replica")));
        assert!(!hello_says_replica(&resp3("master")));
        assert!(!hello_says_replica(&Value::Nil));
        // A value named "role" is not a field name.
        assert!(!hello_says_replica(&Value::Array(vec![
            bulk("x"),
            bulk("role"),
            bulk("replica"),
        ])));
    }

    /// The refusal after a step back is decided before any Redis call (nothing listens on the
    /// port: a call would fail with a connection error instead), and clones share the mark.
    #[tokio::test]
    async fn a_step_back_past_an_expiry_is_refused_without_asking_redis() {
        const T: u64 = 1_700_000_000;
        let options = RedisOptions {
            op_timeout: Duration::from_millis(200),
            connect_timeout: Duration::from_millis(200),
            ping_timeout: Duration::from_millis(200),
        };
        let Ok(connection) = RedisConnection::with_options("redis://127.0.0.1:1", options) else {
            panic!("a valid URL");
        };
        let cache = RedisReplayCache::new(connection, DEFAULT_REPLAY_PREFIX);
        let clone = cache.clone();
        // Redis is unreachable, but the caller's clock was seen.
        assert!(clone
            .check("after-the-step", T + 3613, T + 3600)
            .await
            .is_err());
        let Err(refused) = cache.check("captured", T + 13, T).await else {
            panic!("accepted after the clock went back");
        };
        assert!(
            refused.detail().starts_with("the clock went back"),
            "{refused}"
        );
        assert!(refused
            .detail()
            .contains("already saw 1700003600 (now 1700000000)"));
        // Past the mark, or already expired for the caller: Redis is asked (and is down).
        for (expires_at, now) in [(T + 3601, T), (T + 10, T + 3600)] {
            let Err(error) = cache.check("n", expires_at, now).await else {
                panic!("redis is down");
            };
            assert!(!error.detail().contains("clock went back"), "{error}");
        }
    }

    #[test]
    fn eviction_policy_from_info_memory() {
        let info = |policy: &str| {
            Ok(format!(
                "# Memory\r\nused_memory:1\r\nmaxmemory:0\r\nmaxmemory_policy:{policy}\r\n"
            ))
        };
        assert_eq!(
            eviction_policy(info("noeviction")),
            Ok(EvictionPolicy::NoEviction)
        );
        for policy in ["allkeys-lru", "volatile-ttl", "something-new"] {
            assert_eq!(
                eviction_policy(info(policy)),
                Ok(EvictionPolicy::Evicting(policy.to_owned()))
            );
        }
        assert!(matches!(
            eviction_policy(Ok("# Memory\r\nused_memory:1\r\n".to_owned())),
            Ok(EvictionPolicy::Unknown(_))
        ));
        // Refused by the server: unknown. Lost connection: an error.
        let refused = RedisError::from((
            ErrorKind::ExtensionError,
            "NOPERM",
            "this user has no permissions to run the 'info' command".to_owned(),
        ));
        assert!(matches!(
            eviction_policy(Err(refused)),
            Ok(EvictionPolicy::Unknown(_))
        ));
        let lost = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(eviction_policy(Err(lost)).is_err());
    }

    #[test]
    fn the_primary_named_by_sentinel_masters() {
        let master = |name: &str, flags: &str, port: &str| {
            HashMap::from([
                ("name".to_owned(), name.to_owned()),
                ("ip".to_owned(), "10.0.0.1".to_owned()),
                ("port".to_owned(), port.to_owned()),
                ("flags".to_owned(), flags.to_owned()),
            ])
        };
        let masters = [
            master("other", "master", "1"),
            master("mymaster", "master", "6380"),
        ];
        assert_eq!(
            named_primary(&masters, "mymaster"),
            Some(("10.0.0.1".to_owned(), 6380))
        );
        assert_eq!(named_primary(&masters, "absent"), None);
        for flags in ["master,s_down", "master,o_down", "slave"] {
            assert_eq!(
                named_primary(&[master("mymaster", flags, "6380")], "mymaster"),
                None,
                "{flags}"
            );
        }
        assert_eq!(
            named_primary(&[master("mymaster", "master", "x")], "mymaster"),
            None
        );
        assert!(role_is_primary(&Value::Array(vec![bulk("master")])));
        assert!(!role_is_primary(&Value::Array(vec![bulk("slave")])));
        assert!(!role_is_primary(&Value::Nil));
    }

    #[test]
    fn the_primaries_of_cluster_slots() {
        let node = |host: &str, port: i64, id: &str| {
            Value::Array(vec![bulk(host), Value::Int(port), bulk(id)])
        };
        let range = |start: i64, end: i64, primary: Value, replica: Option<Value>| {
            let mut items = vec![Value::Int(start), Value::Int(end), primary];
            items.extend(replica);
            Value::Array(items)
        };
        let slots = Value::Array(vec![
            range(
                5461,
                10922,
                node("10.0.0.2", 6379, "b"),
                Some(node("10.0.0.9", 6379, "r")),
            ),
            range(0, 5460, node("10.0.0.1", 6379, "a"), None),
            // A second range of the same primary: listed once, with its first range's slot.
            range(16000, 16383, node("10.0.0.2", 6379, "b"), None),
            range(10923, 15999, node("::1", 7000, "c"), None),
            // Unreadable entries are skipped.
            Value::Array(vec![Value::Int(1)]),
            Value::Nil,
        ]);
        let primaries = primaries_from_slots(&slots);
        let seen: Vec<(&str, &str, u16)> = primaries
            .iter()
            .map(|p| (p.address.as_str(), p.id.as_str(), p.slot))
            .collect();
        assert_eq!(
            seen,
            [
                ("10.0.0.1:6379", "a", 0),
                ("10.0.0.2:6379", "b", 5461),
                ("[::1]:7000", "c", 10923)
            ]
        );
        assert!(primaries_from_slots(&Value::Nil).is_empty());
    }

    #[test]
    fn refusals_for_not_being_the_primary() {
        for kind in [
            ErrorKind::ReadOnly,
            ErrorKind::MasterDown,
            ErrorKind::BusyLoadingError,
        ] {
            let error = RedisError::from((kind, "refused"));
            assert!(is_not_primary(&error), "{kind:?}");
            assert!(!is_dead_connection(&error), "{kind:?}");
        }
        assert!(!is_not_primary(&RedisError::from((
            ErrorKind::ResponseError,
            "refused"
        ))));
    }
}

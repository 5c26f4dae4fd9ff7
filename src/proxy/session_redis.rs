//! [`RedisSessionStore`]: sessions in Redis, shared by every proxy of a fleet (log in on one
//! proxy, use the cookie on another, log out anywhere).
//!
//! Keys, all under a configurable prefix `P`:
//! - `P session:<hex SHA-256(id)>` — a small JSON record (user, roles, CSRF token, created,
//!   last seen and, for a login checked against a users file, the user's credential stamp),
//!   with a Redis TTL equal to the earlier of the idle and the absolute expiry. The id itself
//!   is never stored: a dump of Redis cannot be replayed as cookies.
//! - `P user:<hex SHA-256(percent-encoded user name)>` (the name as the identity header
//!   carries it, `encode_value`: the form the memory store compares) — a SET of the user's
//!   session hashes (the per-user index for logout-all and admin revoke), expiring one
//!   absolute timeout after the user's latest login or, if later, when the longest-lived
//!   record a touch extended expires (`TOUCH_SCRIPT`).
//! - `P sessions` — a sorted set of session hashes scored by their expiry: `count()` is its
//!   size, and `create` enforces `max_sessions` with it (no SCAN anywhere).
//! - `P session_seq` — a counter: each login's number, kept in its record (`n`), orders the
//!   logins of one second when `max_sessions_per_user` ends a user's oldest session.
//! - per `delete_user`, `P revoke:<32 hex digits, random>` — the number of sessions it ended,
//!   kept a minute or so (`DELETE_USER_SCRIPT`), so that the call run again after its reply
//!   was lost answers that number, not 0.
//!
//! Writes per request: `get(.., touch = true)` rewrites the record (new last-seen, new TTL)
//! only when the stored last-seen is at least `touch_interval` old (default 5 s), so a busy
//! SPA costs one `GET` per request and one write per session every few seconds. The price: an
//! idle expiry can come up to `touch_interval` earlier than with a write per request.
//!
//! Sessions outlive the proxies, and with them the users file they were created under: a
//! proxy with a users file accepts a session only while its file has the session's user with
//! the credential stamp kept at login (`get_checked`, `users::CredentialStamp`): a user removed,
//! or given another password hash or roles, is refused even by a proxy that never saw the file
//! change. A refused session is left in Redis (a proxy still on an older file during a rolling
//! deploy must not delete sessions made under the newer one); it ends when the proxies
//! reloading the new file end it, or when it expires.
//!
//! Round trips: `get` is one `GET` (plus one Lua script on the touches that write),
//! `create` and `delete_user` one Lua script each (atomic), `delete` one atomic pipeline. Errors and timeouts are [`StoreError`]s: the proxy answers 503
//! `session_store_unavailable` and never falls back to memory. The connection runs a call once
//! more on a new connection when the first one's connection was found dead, and the first may
//! have run with only its reply lost: `create` then finds its own session and keeps it, and
//! `delete_user` its own receipt, so neither acts twice.
//!
//! Limits (documented in docs/DEPLOYMENT.md): the scripts touch keys they derive from set
//! members, so on Redis Cluster (`redis_cluster_nodes`) every key must be in one hash slot:
//! the key prefix must hold a hash tag (`{countersign}:`, checked at load), and one shard
//! holds all the store's keys. Expiry decisions use the proxies' clocks, which must be
//! NTP-synchronised.

use compact_str::CompactString;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use zeroize::{Zeroize as _, Zeroizing};

use super::config::{authority_port, redact_url, ConfigError, ProxyConfig, StoreKind};
use super::session::{
    BoxFuture, LiveSessionTimeouts, Lookup, RequestSession, Session, SessionId, SessionStore,
    SessionTimeouts, StoreError, TOKEN_BYTES,
};
use super::throttle::LoginThrottle;
use super::throttle_redis::RedisLoginThrottle;
use super::users::{CredentialStamp, UsersHandle, CREDENTIAL_STAMP_BYTES};
use crate::clock::SharedClock;
use crate::core::{encode_value, Identity};
use crate::replay::{
    redis_url_parse_problem, split_host_less_redis_url, url_authority_host, HostLessRedisUrl,
    HostLessUrlProblem, RedisCallError, RedisConnection, RedisOptions,
};

/// Default prefix of every key the proxy's Redis stores write.
pub const DEFAULT_KEY_PREFIX: &str = "countersign:";

/// Default minimum age of a session's last-seen time before `touch` rewrites it.
pub const DEFAULT_TOUCH_INTERVAL: Duration = Duration::from_secs(5);

/// `create`: prune expired entries of the count index, enforce the limit, write the record
/// (NX: a colliding id is reported, never overwritten), add it to the user's index and to the
/// count index. Returns 1 + the number of the user's sessions it ended (created), 0 (full) or
/// `{-1, the stored record}` (id already present).
///
/// Whether the id is taken is the script's first question, asked before it prunes, ends or
/// counts anything: the connection runs a call again on a new connection when the first one's
/// connection was found dead (`RedisConnection::run`), and a first run whose reply was lost
/// had done the whole login. Asked last (at the `SET .. NX`), the repeat had already counted
/// that first run's session among the user's, ended one more of the user's real sessions at
/// the cap, taken a login number and, with the store one place from full, answered "full"
/// after the first run took the last place (a refused login that created a session); and the
/// session it had made was left behind, named by no cookie, holding places in both limits
/// until its idle expiry. Asked first, a repeat changes nothing and returns the record, in
/// which `create_session` recognises its own write (its fresh CSRF token) and keeps that
/// session. (Not when the first run's session was ended between the two runs, by a
/// concurrent login of the user at the cap or a revoke: the repeat then logs in afresh.)
///
/// `max_sessions_per_user` (ARGV[9], 0: none): when the user already holds that many live
/// sessions (records in the user's index not ended by the lifetimes ARGV[10] idle and ARGV[5]
/// absolute at ARGV[6]), the oldest (by login time `ca`, then login number `n`; an
/// undecodable record first) are deleted, with their count-index entries and index members,
/// until one more fits, all in this script: two proxies logging one user in at once are
/// serialised by Redis and cannot both find room. A login that ends a counted session takes
/// over its place in `max_sessions` (the count does not grow, so it is never refused for a
/// full store, as in the memory store); one that ends none is checked against
/// `max_sessions` before it ends anything: a login refused for a full store ends nothing.
/// (`ZADD XX INCR 0` reads whether a member is counted without changing it: `ZSCORE` is not
/// among the ACL user's commands, and adding it would break deployments made by the docs.)
/// Only commands of the documented least-privilege ACL user
/// (docs/DEPLOYMENT.md) are used. The record gets its login number from `P session_seq`
/// (KEYS[4]), appended to the JSON object.
///
/// The user's index also loses the members whose record is gone (logged out or expired): a
/// logout deletes the record only (one round trip, without the user's name), so without this
/// the index of a user who logs in more often than once per absolute timeout (a service
/// account) would keep every session it ever had, and logout-all and revoke would walk them
/// all. So the index holds the user's live sessions plus those ended since the last login.
const CREATE_SCRIPT: &str = r#"
local existing = redis.call('GET', KEYS[1])
if existing then return {-1, existing} end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
local held = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('EXISTS', ARGV[8] .. member) == 0 then redis.call('SREM', KEYS[2], member)
  else held[#held + 1] = member end
end
local cap = tonumber(ARGV[9])
local ended = 0
local to_end = {}
if cap > 0 and #held >= cap then
  local now, idle, absolute = tonumber(ARGV[6]), tonumber(ARGV[10]), tonumber(ARGV[5])
  local live = {}
  for _, member in ipairs(held) do
    local ok, record = pcall(cjson.decode, redis.call('GET', ARGV[8] .. member))
    if ok and type(record) == 'table' and type(record.ca) == 'number' then
      local ls = tonumber(record.ls) or record.ca
      if math.min(ls + idle, record.ca + absolute) > now then
        live[#live + 1] = {member, record.ca, tonumber(record.n) or 0}
      end
    else
      live[#live + 1] = {member, -1, 0}
    end
  end
  if #live >= cap then
    table.sort(live, function(a, b)
      if a[2] ~= b[2] then return a[2] < b[2] end
      if a[3] ~= b[3] then return a[3] < b[3] end
      return a[1] < b[1]
    end)
    for i = 1, #live - cap + 1 do
      to_end[#to_end + 1] = live[i][1]
    end
  end
end
local counted = 0
for _, member in ipairs(to_end) do
  if redis.call('ZADD', KEYS[3], 'XX', 'INCR', 0, member) then counted = counted + 1 end
end
if counted == 0 and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[7]) then return 0 end
for _, member in ipairs(to_end) do
  redis.call('DEL', ARGV[8] .. member)
  redis.call('ZREM', KEYS[3], member)
  redis.call('SREM', KEYS[2], member)
  ended = ended + 1
end
local seq = redis.call('INCR', KEYS[4])
local value = string.sub(ARGV[1], 1, -2) .. ',"n":' .. seq .. '}'
if not redis.call('SET', KEYS[1], value, 'NX', 'EX', ARGV[2]) then return -1 end
redis.call('SADD', KEYS[2], ARGV[3])
local left = redis.call('PTTL', KEYS[2])
if left < tonumber(ARGV[5]) * 1000 then redis.call('EXPIRE', KEYS[2], ARGV[5]) end
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
return 1 + ended
"#;

/// `get`'s touch: rewrite the record with its new TTL (XX: a session deleted meanwhile, by a
/// logout on another proxy, is not brought back; then 0), set its expiry in the count index,
/// and keep it in its user's index for at least as long as the record lives. Returns 1.
///
/// The count index entry is set, not only moved (no `ZADD .. XX`): the record exists (the
/// `SET .. XX` above), so it must be counted, and its entry may be gone though it is live: a
/// proxy whose clock is ahead prunes (`prune`, each login) the entries whose expiry passed by
/// its clock. With `XX` such a session, kept in use, was never counted again and
/// `max_sessions` stopped bounding the fleet (tests/session_review.rs).
///
/// The user's index must outlive every record in it, or a revoke or a logout-all finds
/// nothing to end. Its TTL was set at login only, to the absolute timeout of that moment: a
/// session whose lifetime a reload raised (`absolute_timeout`, `idle_timeout`), or one made by
/// a proxy with a longer timeout than the one that logged the user in last, outlived it, and
/// could then no longer be revoked. So every write that extends a record extends the index
/// too, never shortening it (no `EXPIRE … GT`: that needs Redis 7); the `SADD` puts back an
/// index that already expired. The index's time left is read in milliseconds (`PTTL`): `TTL`
/// rounds to whole seconds, so an index with 1.5 s left read as 2, "not shorter" than a record
/// just given 2 s, and expired up to half a second before it, when a revoke found nothing.
const TOUCH_SCRIPT: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'XX', 'EX', ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[4])
local left = redis.call('PTTL', KEYS[3])
if left < tonumber(ARGV[2]) * 1000 then redis.call('EXPIRE', KEYS[3], ARGV[2]) end
return 1
";

/// `delete_user`: delete every session in the user's index and the index itself; returns how
/// many session records existed.
///
/// KEYS[3] is this call's receipt (`P revoke:<32 hex, random>`, drawn per call): the script
/// leaves its count there for ARGV[2] seconds, and a run that finds it returns that count and
/// does nothing else. The connection runs a call again on a new connection when the first
/// one's connection was found dead, and a first run whose reply was lost had ended the
/// sessions: the repeat found none, and a revoke that ended sessions answered
/// `"revoked": 0`.
const DELETE_USER_SCRIPT: &str = r"
local done = redis.call('GET', KEYS[3])
if done then return tonumber(done) end
local members = redis.call('SMEMBERS', KEYS[1])
local deleted = 0
for _, member in ipairs(members) do
  deleted = deleted + redis.call('DEL', ARGV[1] .. member)
  redis.call('ZREM', KEYS[2], member)
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[3], deleted, 'EX', ARGV[2])
return deleted
";

/// The stored form of a session (short field names: this is in Redis once per session).
///
/// Unknown fields are ignored when decoding, so proxies of different versions read each
/// other's records: `s` was added later, and an older proxy reads a record with it (and drops
/// it if it rewrites the record on a touch, leaving a record checked as one without a stamp).
#[derive(Serialize, Deserialize)]
struct Record {
    /// User name.
    u: CompactString,
    /// Roles.
    r: Vec<CompactString>,
    /// CSRF token (base64url).
    c: String,
    /// Created at (unix seconds).
    ca: u64,
    /// Last seen (unix seconds).
    ls: u64,
    /// Login number (`P session_seq` at the login; appended by `CREATE_SCRIPT`), ordering
    /// the logins of one second for `max_sessions_per_user` (absent: a record from before it,
    /// or rewritten by such a proxy on a touch; ordered as 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    n: Option<u64>,
    /// The user's [`CredentialStamp`] in the users file the login was checked against
    /// (absent: no users file, `verify_url`; or a record from before stamps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    s: Option<StoredStamp>,
}

/// A [`CredentialStamp`] in a record: its base64url text (22 characters), decoded straight
/// from the record's text into its 16 bytes (no allocation on the lookup path). A record whose
/// `s` is not such a text is undecodable, as any malformed record.
struct StoredStamp(CredentialStamp);

/// Length of a stamp's base64url text (16 bytes, no padding).
const STAMP_TEXT_LEN: usize = 22;

impl Serialize for StoredStamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut text = [0u8; STAMP_TEXT_LEN];
        let written = URL_SAFE_NO_PAD
            .encode_slice(self.0.as_bytes(), &mut text)
            .map_err(serde::ser::Error::custom)?;
        let text = std::str::from_utf8(&text[..written]).map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(text)
    }
}

impl<'de> Deserialize<'de> for StoredStamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = StoredStamp;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a credential stamp (22 base64url characters)")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<StoredStamp, E> {
                let mut bytes = [0u8; CREDENTIAL_STAMP_BYTES];
                match URL_SAFE_NO_PAD.decode_slice(text.as_bytes(), &mut bytes) {
                    Ok(CREDENTIAL_STAMP_BYTES) if text.len() == STAMP_TEXT_LEN => {
                        Ok(StoredStamp(CredentialStamp::from_bytes(bytes)))
                    }
                    _ => Err(E::custom("not a credential stamp")),
                }
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        self.c.zeroize();
    }
}

/// A [`SessionStore`] in Redis. See the module documentation for the key layout.
#[derive(Clone)]
pub struct RedisSessionStore {
    connection: RedisConnection,
    /// The lifetimes, read at each lookup (shared by clones): a reload that changes them
    /// applies to the sessions in Redis too, as far as their keys' TTLs allow (see
    /// [`SessionStore::set_timeouts`] below).
    timeouts: LiveSessionTimeouts,
    max_sessions: usize,
    /// `session.max_sessions_per_user` (0: no cap), read at each login (shared by clones, so
    /// a reload reaches every clone).
    max_per_user: Arc<AtomicUsize>,
    touch_interval: u64,
    session_prefix: String,
    user_prefix: String,
    count_key: String,
    seq_key: String,
    /// Prefix of `delete_user`'s receipts (`... revoke:`, see [`DELETE_USER_SCRIPT`]).
    revoke_prefix: String,
}

impl fmt::Debug for RedisSessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSessionStore")
            .field("connection", &self.connection)
            .field("timeouts", &self.timeouts)
            .field("max_sessions", &self.max_sessions)
            .field("max_per_user", &self.max_per_user)
            .field("touch_interval", &self.touch_interval)
            .field("session_prefix", &self.session_prefix)
            .finish_non_exhaustive()
    }
}

/// Lower-case hex of `bytes` (key names).
pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

fn store_error(error: RedisCallError) -> StoreError {
    StoreError::new(error.to_string())
}

/// What `CREATE_SCRIPT` answered.
enum CreateReply {
    /// 1 + the sessions it ended (created), or 0 (full).
    Done(i64),
    /// The id was taken: the record stored under it (zeroized when dropped: it holds a CSRF
    /// token).
    Taken(Zeroizing<Vec<u8>>),
}

fn create_reply(reply: ::redis::Value) -> Result<CreateReply, StoreError> {
    match reply {
        ::redis::Value::Int(created) => Ok(CreateReply::Done(created)),
        ::redis::Value::Array(mut items) if items.len() == 2 => match (items.pop(), items.pop()) {
            (Some(::redis::Value::BulkString(stored)), Some(::redis::Value::Int(-1))) => {
                Ok(CreateReply::Taken(Zeroizing::new(stored)))
            }
            _ => Err(StoreError::new("unexpected answer of the login script")),
        },
        _ => Err(StoreError::new("unexpected answer of the login script")),
    }
}

/// Whether `stored` (the record found under a taken id) is the write of the login whose CSRF
/// token is `csrf`: a token of [`TOKEN_BYTES`] from the OS's generator, drawn for this login
/// alone. Compared in constant time (it is a secret); an undecodable record is not ours.
fn is_own_record(stored: &[u8], csrf: &str) -> bool {
    serde_json::from_slice::<Record>(stored)
        .is_ok_and(|found| bool::from(found.c.as_bytes().ct_eq(csrf.as_bytes())))
}

/// Whether `users` still has the user of `record` as at its login: with the same
/// [`CredentialStamp`] (name, password hash, roles). A record without a stamp (written before
/// stamps existed, or rewritten by such a proxy on a touch) is compared on what it holds: the
/// user must still exist with the same roles (a password change goes unseen for it).
fn credentials_current(users: &UsersHandle, record: &Record) -> bool {
    match &record.s {
        Some(StoredStamp(stamp)) => users.stamp_is_current(&record.u, stamp),
        None => users.has_user_with_roles(&record.u, &record.r),
    }
}

impl RedisSessionStore {
    /// A store on `connection` with keys under `key_prefix`, these timeouts, and at most
    /// `max_sessions` sessions (live, or expired and not yet pruned) across the fleet.
    pub fn new(
        connection: RedisConnection,
        key_prefix: &str,
        timeouts: SessionTimeouts,
        max_sessions: usize,
    ) -> Self {
        RedisSessionStore {
            connection,
            timeouts: LiveSessionTimeouts::new(timeouts),
            max_sessions,
            max_per_user: Arc::new(AtomicUsize::new(0)),
            touch_interval: DEFAULT_TOUCH_INTERVAL.as_secs(),
            session_prefix: format!("{key_prefix}session:"),
            user_prefix: format!("{key_prefix}user:"),
            count_key: format!("{key_prefix}sessions"),
            seq_key: format!("{key_prefix}session_seq"),
            revoke_prefix: format!("{key_prefix}revoke:"),
        }
    }

    /// Sets `session.max_sessions_per_user`: a login of a user who already holds `max` live
    /// sessions ends that user's oldest first, atomically in the login's script (zero is
    /// taken as one). Without it, no per-user cap.
    pub fn max_sessions_per_user(self, max: usize) -> Self {
        self.max_per_user.store(max.max(1), Ordering::Relaxed);
        self
    }

    /// Sets the minimum age of the stored last-seen time before `touch` writes (whole seconds;
    /// zero writes on every touch that moves last-seen forward). At most half the idle timeout
    /// is used: a longer interval is shortened to that.
    pub fn touch_interval(mut self, interval: Duration) -> Self {
        self.touch_interval = interval.as_secs();
        self
    }

    /// The timeouts now (as configured, or as a reload set them).
    pub fn timeouts(&self) -> SessionTimeouts {
        self.timeouts.get()
    }

    /// The Redis connection.
    pub fn connection(&self) -> &RedisConnection {
        &self.connection
    }

    /// The touch interval in use: at most half the idle timeout, so a session in use is
    /// rewritten well before its idle expiry (an interval of the idle timeout or more would let
    /// it expire however often it is used).
    fn effective_touch_interval(&self) -> u64 {
        self.touch_interval.min(self.idle_secs() / 2)
    }

    fn idle_secs(&self) -> u64 {
        self.timeouts.secs().0
    }

    fn absolute_secs(&self) -> u64 {
        self.timeouts.secs().1
    }

    fn expires_at(&self, created_at: u64, last_seen: u64) -> u64 {
        let (idle, absolute) = self.timeouts.secs();
        last_seen
            .saturating_add(idle)
            .min(created_at.saturating_add(absolute))
    }

    /// The user index key: hashed, so any user name gives a short, fixed-size key. Hashes the
    /// percent-encoded name, the form the memory store compares.
    fn user_key(&self, user: &str) -> String {
        let digest = Sha256::digest(encode_value(user).as_bytes());
        format!("{}{}", self.user_prefix, hex(&digest))
    }

    fn session(&self, record: &Record, last_seen: u64) -> Session {
        let (idle, absolute) = self.timeouts.secs();
        Session {
            user: record.u.clone(),
            roles: record.r.clone(),
            csrf_token: record.c.clone(),
            created_at: record.ca,
            last_seen,
            idle_expires_at: last_seen.saturating_add(idle),
            absolute_expires_at: record.ca.saturating_add(absolute),
        }
    }

    fn encode(record: &Record) -> Result<String, StoreError> {
        serde_json::to_string(record)
            .map_err(|e| StoreError::new(format!("cannot encode session record: {e}")))
    }

    async fn create_session(
        &self,
        identity: &Identity,
        stamp: Option<CredentialStamp>,
        now: u64,
    ) -> Result<(SessionId, Session), StoreError> {
        let mut csrf = [0u8; TOKEN_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut csrf);
        let record = Record {
            u: identity.user.clone(),
            r: identity.roles.clone(),
            c: URL_SAFE_NO_PAD.encode(csrf),
            ca: now,
            ls: now,
            s: stamp.map(StoredStamp),
            n: None,
        };
        csrf.zeroize();
        // Zeroized when dropped, on every path: an early `?` (a Redis error) returns before
        // any explicit zeroize would run.
        let value = Zeroizing::new(Self::encode(&record)?);
        let expires_at = self.expires_at(now, now);
        let ttl = expires_at.saturating_sub(now).max(1);
        let user_key = self.user_key(&identity.user);
        let cap = self.max_per_user.load(Ordering::Relaxed);
        // A 256-bit id colliding with a live one is astronomically unlikely; the script refuses
        // to overwrite, and a new id is drawn, so even then no session is taken over. The id
        // is found taken far more often by this very login: its first run wrote the session
        // and only its reply was lost, and the connection ran it again (`CREATE_SCRIPT`). That
        // record carries this login's CSRF token, fresh from the OS's generator above: then
        // the session is this login's, made once, and kept.
        let mut result = Err(StoreError::new("could not draw an unused session id"));
        for _ in 0..3 {
            let id = SessionId::generate();
            let member = hex(&id.store_key());
            let mut cmd = ::redis::cmd("EVAL");
            cmd.arg(CREATE_SCRIPT)
                .arg(4)
                .arg(format!("{}{member}", self.session_prefix))
                .arg(&user_key)
                .arg(&self.count_key)
                .arg(&self.seq_key)
                .arg(value.as_str())
                .arg(ttl)
                .arg(&member)
                .arg(expires_at)
                .arg(self.absolute_secs().max(1))
                .arg(now)
                .arg(self.max_sessions)
                .arg(&self.session_prefix)
                .arg(cap)
                .arg(self.idle_secs());
            let reply: ::redis::Value = self.connection.query(&cmd).await.map_err(store_error)?;
            let created = match create_reply(reply)? {
                CreateReply::Done(created) => created,
                CreateReply::Taken(stored) => {
                    if is_own_record(&stored, &record.c) {
                        tracing::debug!(
                            user = identity.user.as_str(),
                            "login's script ran twice (its first reply was lost with its \
                             connection); the session of its first run is kept"
                        );
                        result = Ok((id, self.session(&record, now)));
                        break;
                    }
                    continue;
                }
            };
            match created {
                1.. => {
                    if created > 1 {
                        tracing::info!(
                            user = identity.user.as_str(),
                            ended = created - 1,
                            max_sessions_per_user = cap,
                            "login ended the user's oldest session(s) \
                             (session.max_sessions_per_user)"
                        );
                    }
                    result = Ok((id, self.session(&record, now)));
                    break;
                }
                0 => {
                    result = Err(StoreError::new(format!(
                        "session limit reached ({} sessions)",
                        self.max_sessions
                    )));
                    break;
                }
                _ => continue,
            }
        }
        result
    }

    /// The live session `id`; with `users` (the proxy's users file), only while the file still
    /// has its user as at login ([`credentials_current`]), checked before any touch.
    async fn get_session(
        &self,
        id: &SessionId,
        now: u64,
        touch: bool,
        users: Option<&UsersHandle>,
    ) -> Result<Option<Session>, StoreError> {
        let member = hex(&id.store_key());
        let key = format!("{}{member}", self.session_prefix);
        let mut get = ::redis::cmd("GET");
        get.arg(&key);
        // Bytes, not a `String`: a value that is not UTF-8 (not ours, or corrupted) must be
        // "no session" like any other undecodable record, not a conversion error answered 503
        // on every request until it expires.
        let Some(mut value) = self
            .connection
            .query::<Option<Vec<u8>>>(&get)
            .await
            .map_err(store_error)?
        else {
            return Ok(None);
        };
        let decoded = serde_json::from_slice::<Record>(&value);
        value.zeroize();
        let mut record = match decoded {
            Ok(record) => record,
            Err(e) => {
                // Not ours or corrupted: treat as no session (the user logs in again) rather
                // than 503 on every request until it expires.
                // Where and what kind of fault, never serde_json's message: it quotes the
                // value it found ("invalid type: string \"…\""), which in a session record
                // can be a CSRF token or a user name written where another field belongs.
                tracing::warn!(
                    fault = ?e.classify(),
                    line = e.line(),
                    column = e.column(),
                    "undecodable session record in redis; ignored"
                );
                return Ok(None);
            }
        };
        let expires_at = self.expires_at(record.ca, record.ls);
        if now >= expires_at {
            return Ok(None);
        }
        if let Some(users) = users {
            if !credentials_current(users, &record) {
                // Not deleted: in a rolling deploy this proxy's file may be the older one, and
                // the session may be current for the proxies on the newer file. No touch
                // either: a refused request changes nothing.
                tracing::debug!(
                    user = record.u.as_str(),
                    "session refused: its user is not in the users file as at login"
                );
                return Ok(None);
            }
        }
        if touch && now > record.ls && now - record.ls >= self.effective_touch_interval() {
            record.ls = now;
            let new_expiry = self.expires_at(record.ca, now);
            let ttl = new_expiry.saturating_sub(now).max(1);
            let value = Zeroizing::new(Self::encode(&record)?);
            let mut touch = ::redis::cmd("EVAL");
            touch
                .arg(TOUCH_SCRIPT)
                .arg(3)
                .arg(&key)
                .arg(&self.count_key)
                .arg(self.user_key(&record.u))
                .arg(value.as_str())
                .arg(ttl)
                .arg(new_expiry)
                .arg(&member);
            let written: i64 = self.connection.query(&touch).await.map_err(store_error)?;
            if written == 0 {
                // Deleted between our GET and SET: the session has ended.
                return Ok(None);
            }
        }
        let last_seen = record.ls;
        Ok(Some(self.session(&record, last_seen)))
    }

    async fn delete_session(&self, id: &SessionId) -> Result<(), StoreError> {
        let member = hex(&id.store_key());
        // The user index keeps the stale member until the user's next login prunes it, or the
        // index expires, or the user is revoked (deleting a missing key there is harmless):
        // this keeps logout one round trip, without the record's user name.
        let mut pipe = ::redis::pipe();
        pipe.atomic()
            .cmd("DEL")
            .arg(format!("{}{member}", self.session_prefix))
            .ignore()
            .cmd("ZREM")
            .arg(&self.count_key)
            .arg(&member)
            .ignore();
        self.connection
            .query_pipe::<()>(&pipe)
            .await
            .map_err(store_error)
    }

    async fn delete_user_sessions(&self, user: &str) -> Result<usize, StoreError> {
        // A fresh receipt per call, in the command itself: the connection's retry sends the
        // same command, so a repeat after a lost reply finds the first run's count.
        let mut receipt = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut receipt);
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(DELETE_USER_SCRIPT)
            .arg(3)
            .arg(self.user_key(user))
            .arg(&self.count_key)
            .arg(format!("{}{}", self.revoke_prefix, hex(&receipt)))
            .arg(&self.session_prefix)
            .arg(self.receipt_ttl_secs());
        let deleted: u64 = self.connection.query(&cmd).await.map_err(store_error)?;
        Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
    }

    /// How long a `delete_user` receipt is kept: longer than a repeat can come after the first
    /// run (the retry follows within one connect deadline and two call deadlines), and at
    /// least a minute.
    fn receipt_ttl_secs(&self) -> u64 {
        let options = self.connection.options();
        options
            .connect_timeout
            .saturating_add(options.op_timeout.saturating_mul(2))
            .as_secs()
            .saturating_add(60)
    }

    async fn count_sessions(&self) -> Result<usize, StoreError> {
        let mut cmd = ::redis::cmd("ZCARD");
        cmd.arg(&self.count_key);
        let count: u64 = self.connection.query(&cmd).await.map_err(store_error)?;
        Ok(usize::try_from(count).unwrap_or(usize::MAX))
    }

    /// Removes count-index entries of sessions expired at `now` (records expire by their
    /// own TTL; this only keeps `count()` close to the live number). `create` does the same.
    pub async fn prune(&self, now: u64) -> Result<usize, StoreError> {
        let mut cmd = ::redis::cmd("ZREMRANGEBYSCORE");
        cmd.arg(&self.count_key).arg("-inf").arg(now);
        let removed: u64 = self.connection.query(&cmd).await.map_err(store_error)?;
        Ok(usize::try_from(removed).unwrap_or(usize::MAX))
    }
}

/// Redis settings of the proxy's stores: the `[session] redis_*` keys of `proxy.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTuning {
    /// Deadline of one Redis call (`redis_timeout`, default 500ms).
    pub op_timeout: Duration,
    /// Deadline of (re)connecting (`redis_connect_timeout`, default 2s).
    pub connect_timeout: Duration,
    /// Minimum age of a session's last-seen time before a touch rewrites it
    /// (`redis_touch_interval`, default 5s).
    pub touch_interval: Duration,
    /// PEM CA certificate(s) that replace the public web roots for `rediss://`
    /// (`redis_ca_file`, relative to the config file).
    pub ca_file: Option<PathBuf>,
    /// Redis Sentinel (`redis_sentinels`, `redis_sentinel_master`, `redis_sentinel_password`):
    /// the primary is the one the sentinels name, and `redis_url` (without a host) holds only
    /// the credentials, database and TLS of the connection to it.
    pub sentinel: Option<SentinelTuning>,
    /// Redis Cluster (`redis_cluster_nodes`, `host:port` each): the stores use the cluster
    /// these seed nodes belong to, and `redis_url` (without a host) holds only the credentials
    /// and TLS. The key prefix then holds a hash tag (checked at load), so every key of the
    /// stores is in one slot.
    pub cluster_nodes: Option<Vec<String>>,
}

/// The `[session] redis_sentinel*` keys. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelTuning {
    /// The sentinels, `host:port` each (`redis_sentinels`).
    pub sentinels: Vec<String>,
    /// The master name they monitor (`redis_sentinel_master`).
    pub master_name: String,
    /// Password of the sentinels themselves (`redis_sentinel_password`), if they need one.
    pub password: Option<String>,
    /// TLS to the sentinels (`redis_sentinel_tls`), checked against `redis_ca_file` or the
    /// public web roots, as the primary's.
    pub tls: bool,
}

impl fmt::Debug for SentinelTuning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelTuning")
            .field("sentinels", &self.sentinels)
            .field("master_name", &self.master_name)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl Default for RedisTuning {
    fn default() -> Self {
        let options = RedisOptions::default();
        RedisTuning {
            op_timeout: options.op_timeout,
            connect_timeout: options.connect_timeout,
            touch_interval: DEFAULT_TOUCH_INTERVAL,
            ca_file: None,
            sentinel: None,
            cluster_nodes: None,
        }
    }
}

/// A session store and a login throttle, as the proxy holds them.
pub type ProxyStores = (Arc<dyn SessionStore>, Arc<dyn LoginThrottle>);

/// The Redis URLs the proxy accepts (`session.redis_url`), for messages.
pub const ACCEPTED_REDIS_URLS: &str =
    "redis://[user:password@]host[:port][/db] or rediss://[user:password@]host[:port][/db]";

/// The connection of the proxy's Redis stores to `url` (`session.redis_url`), with the
/// `[session] redis_*` timeouts and, with `redis_ca_file`, that file read and its certificates
/// parsed; with `redis_sentinels`, to the primary the sentinels name (the URL, without a host,
/// giving the credentials, database and TLS). Does not connect. `run` ([`stores_from_config`]) and `check-config`
/// (`ProxyConfig::check_files`) both go through here, so they accept the same settings. Errors
/// name the config file and the key at fault (the URL first), never the password.
pub fn redis_connection(config: &ProxyConfig, url: &str) -> Result<RedisConnection, ConfigError> {
    let tuning = &config.session.redis;
    let options = RedisOptions {
        op_timeout: tuning.op_timeout,
        connect_timeout: tuning.connect_timeout,
        // The readiness check (`/readyz`, and the startup and `check-config --online` checks)
        // gets the call deadline, `redis_timeout`, as docs/OPERATIONS.md says: a shorter one
        // made a Redis answering calls in time look not ready, and each such timeout dropped
        // the shared connection (a reconnect for the next request). Probes are not slowed by
        // it: `/readyz` reuses an answer for 2 s and shares a check in progress.
        ping_timeout: tuning.op_timeout,
    };
    let url_error = |problem: String| {
        ConfigError::new(
            &config.source,
            "session.redis_url",
            format!(
                "invalid redis URL {:?}: {problem} (accepted: {ACCEPTED_REDIS_URLS})",
                redact_url(url)
            ),
        )
    };
    // The proxy's own parse first: `RedisConnection`'s message lists `redis+unix://`, which
    // the library accepts and the proxy's config does not. The parser's messages are fixed
    // texts ("Redis URL did not parse", "Invalid database number"), never the URL.
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err(url_error(
            "the scheme must be redis:// or rediss://".to_owned(),
        ));
    }
    if let Some(sentinel) = &tuning.sentinel {
        return sentinel_connection(config, url, sentinel, options);
    }
    if let Some(nodes) = &tuning.cluster_nodes {
        return cluster_connection(config, url, nodes, options);
    }
    let rest = url.split_once("://").map_or("", |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if url_authority_host(authority).is_empty() {
        return Err(url_error(
            "no host (name the primary's host, or configure session.redis_sentinels and \
             session.redis_sentinel_master)"
                .to_owned(),
        ));
    }
    if let Some(problem) = redis_url_parse_problem(url) {
        return Err(url_error(problem));
    }
    // The `url` crate reads `host:` as "no port", i.e. 6379; and port 0 cannot be connected to.
    authority_port(authority).map_err(url_error)?;
    let connection = match &tuning.ca_file {
        None => RedisConnection::with_options(url, options),
        Some(file) => {
            let ca_error = |problem: String| {
                ConfigError::new(&config.source, "session.redis_ca_file", problem)
            };
            let pem = super::config::read_ca_file(file).map_err(ca_error)?;
            return RedisConnection::with_tls_root_cert(url, options, &pem)
                .map_err(|e| ca_error(format!("{}: {e}", file.display())));
        }
    };
    connection.map_err(|e| url_error(e.to_string()))
}

/// The host-less `url` of [`redis_connection`] with `redis_sentinels` or `redis_cluster_nodes`
/// taken apart ([`split_host_less_redis_url`]); a problem is put in words by `url_error`, a
/// host named in it by `names_host` (where the servers come from instead).
fn host_less_url<E>(
    url: &str,
    url_error: impl Fn(&str) -> E,
    names_host: &str,
) -> Result<HostLessRedisUrl, E> {
    split_host_less_redis_url(url).map_err(|problem| match problem {
        HostLessUrlProblem::NamesHost(_) => url_error(names_host),
        HostLessUrlProblem::Unparsable(text) => url_error(&text),
        other => url_error(&other.to_string()),
    })
}

/// [`redis_connection`] with `redis_sentinels`: `url` holds no host (`redis://[user:password@]
/// [/db]`, or `rediss://` for TLS to the primary), only the credentials, database and TLS.
fn sentinel_connection(
    config: &ProxyConfig,
    url: &str,
    sentinel: &SentinelTuning,
    options: RedisOptions,
) -> Result<RedisConnection, ConfigError> {
    let url_error = |problem: &str| {
        ConfigError::new(
            &config.source,
            "session.redis_url",
            format!(
                "invalid redis URL {:?} with session.redis_sentinels: {problem} (accepted: \
                 {ACCEPTED_SENTINEL_REDIS_URLS})",
                redact_url(url)
            ),
        )
    };
    // What the sentinels do not give: the primary's user, password, database and TLS.
    let info = host_less_url(
        url,
        url_error,
        "it names a host, but the sentinels name the primary: leave the host out, the URL only \
         holds the credentials, database and TLS",
    )?;
    let node = info.into_sentinel_options(sentinel.password.clone(), sentinel.tls);
    // The sentinel settings are checked on their own first, so that their errors name their
    // key and the CA file's name only what is wrong with the file.
    let connection =
        RedisConnection::sentinel(&sentinel.sentinels, &sentinel.master_name, &node, options)
            .map_err(|e| {
                ConfigError::new(
                    &config.source,
                    "session.redis_sentinels",
                    format!("{e} (each entry host:port, e.g. \"10.0.0.1:26379\")"),
                )
            })?;
    let Some(file) = &config.session.redis.ca_file else {
        return Ok(connection);
    };
    // A private CA: the primary the sentinels name must present a certificate it issued, for
    // the address the sentinels announce; with `redis_sentinel_tls`, each sentinel too, for the
    // host of its entry.
    let ca_error =
        |problem: String| ConfigError::new(&config.source, "session.redis_ca_file", problem);
    let pem = super::config::read_ca_file(file).map_err(ca_error)?;
    RedisConnection::sentinel_with_tls_root_cert(
        &sentinel.sentinels,
        &sentinel.master_name,
        &node,
        options,
        &pem,
    )
    .map_err(|e| ca_error(format!("{}: {e}", file.display())))
}

/// [`redis_connection`] with `redis_cluster_nodes`: `url` holds no host (`redis://[user:
/// password@]`, or `rediss://` for TLS to the nodes), only the credentials and TLS, which every
/// node's URL gets.
fn cluster_connection(
    config: &ProxyConfig,
    url: &str,
    nodes: &[String],
    options: RedisOptions,
) -> Result<RedisConnection, ConfigError> {
    let url_error = |problem: &str| {
        ConfigError::new(
            &config.source,
            "session.redis_url",
            format!(
                "invalid redis URL {:?} with session.redis_cluster_nodes: {problem} (accepted: \
                 {ACCEPTED_CLUSTER_REDIS_URLS})",
                redact_url(url)
            ),
        )
    };
    let info = host_less_url(
        url,
        url_error,
        "it names a host, but the nodes are listed in session.redis_cluster_nodes: leave the \
         host out, the URL only holds the credentials and TLS",
    )?;
    if info.db != 0 {
        return Err(url_error(
            "a Redis Cluster has only database 0: leave the /db out",
        ));
    }
    // Each node: the URL's scheme and credentials, the node's host:port.
    let urls: Vec<String> = nodes
        .iter()
        .map(|node| format!("{}{node}", info.prefix))
        .collect();
    let nodes_error = |problem: String| {
        ConfigError::new(
            &config.source,
            "session.redis_cluster_nodes",
            format!("{problem} (each entry host:port, e.g. \"10.0.0.1:6379\")"),
        )
    };
    let Some(file) = &config.session.redis.ca_file else {
        return RedisConnection::cluster(&urls, options).map_err(|e| nodes_error(e.to_string()));
    };
    // The node settings are checked on their own first, so that their errors name their key
    // and the CA file's name only what is wrong with the file.
    RedisConnection::cluster(&urls, options).map_err(|e| nodes_error(e.to_string()))?;
    let ca_error =
        |problem: String| ConfigError::new(&config.source, "session.redis_ca_file", problem);
    let pem = super::config::read_ca_file(file).map_err(ca_error)?;
    RedisConnection::cluster_with_tls_root_cert(&urls, options, &pem)
        .map_err(|e| ca_error(format!("{}: {e}", file.display())))
}

/// The `redis_url` forms the proxy accepts with `redis_cluster_nodes`, for messages.
pub const ACCEPTED_CLUSTER_REDIS_URLS: &str =
    "redis://[user:password@] or rediss://[user:password@], without a host";

/// The `redis_url` forms the proxy accepts with `redis_sentinels`, for messages.
pub const ACCEPTED_SENTINEL_REDIS_URLS: &str =
    "redis://[user:password@][/db] or rediss://[user:password@][/db], without a host";

/// The proxy's Redis stores for `[session] store = "redis"`: a session store and a login
/// throttle on one shared connection to `url`, keys under `key_prefix`, plus the count-index
/// pruner. Does not connect (the first request does; `/readyz` reports whether Redis answers),
/// so a proxy can start while Redis is down. A bad URL or CA file is an error naming the config
/// file and key, without the password ([`redis_connection`], which `check-config` uses too).
pub fn stores_from_config(
    config: &ProxyConfig,
    url: &str,
    key_prefix: &str,
    timeouts: SessionTimeouts,
    clock: SharedClock,
) -> Result<ProxyStores, String> {
    let tuning = &config.session.redis;
    let connection = redis_connection(config, url).map_err(|e| e.to_string())?;
    tracing::info!(
        endpoint = connection.endpoint(),
        key_prefix,
        "sessions and login throttle in redis"
    );
    let store = Arc::new(
        RedisSessionStore::new(
            connection.clone(),
            key_prefix,
            timeouts,
            config.session.max_sessions,
        )
        .max_sessions_per_user(config.session.max_sessions_per_user)
        .touch_interval(tuning.touch_interval),
    );
    let _pruner = store.spawn_pruner(config.session.sweep_interval, clock);
    let throttle = Arc::new(RedisLoginThrottle::new(
        connection,
        key_prefix,
        config.auth.throttle,
    ));
    Ok((store, throttle))
}

/// What [`check_redis`] found for the proxy's Redis: the config key that names it, the
/// endpoint checked (without credentials), and whether it is usable (the reason when not).
#[derive(Debug, Clone)]
pub struct RedisCheck {
    /// `session.redis_sentinels` when the primary is found through Sentinel, else
    /// `session.redis_url`.
    pub key: &'static str,
    /// The endpoint, as logs name it (never the password).
    pub endpoint: String,
    /// Ok: what was found; Err: why the stores cannot use it (no password in either).
    pub outcome: Result<String, String>,
}

/// The Redis of `[session] store = "redis"` checked once, with the settings `run` uses
/// ([`redis_connection`]: URL, credentials, CA file, Sentinel, timeouts) on a connection of its
/// own: the connection check every new connection of the stores makes (connect, `AUTH`, the
/// Sentinel lookup of the primary, `maxmemory-policy` must be `noeviction`), a `PING`, then the
/// readiness check `/readyz` makes (the server must be the primary). Bounded by the configured
/// `redis_connect_timeout` and `redis_timeout`. None with `store = "memory"`. Used by
/// `check-config --online` and by `run` at startup.
pub async fn check_redis(config: &ProxyConfig) -> Option<RedisCheck> {
    let StoreKind::Redis { url, .. } = &config.session.store else {
        return None;
    };
    let key = if config.session.redis.sentinel.is_some() {
        "session.redis_sentinels"
    } else if config.session.redis.cluster_nodes.is_some() {
        "session.redis_cluster_nodes"
    } else {
        "session.redis_url"
    };
    let connection = match redis_connection(config, url) {
        Ok(connection) => connection,
        Err(e) => {
            return Some(RedisCheck {
                key,
                endpoint: redact_url(url),
                outcome: Err(e.problem().to_owned()),
            })
        }
    };
    let endpoint = connection.endpoint().to_owned();
    // This check reports its own outcome; at `run`'s startup the stores' connection logs the
    // outage (once), so this one must not log it again.
    connection.set_outage_log(false);
    // The first call connects: the connection check (credentials, Sentinel, eviction policy)
    // runs there, and its error says what failed.
    let ping = ::redis::cmd("PING");
    let outcome = match connection.query::<String>(&ping).await {
        Err(e) => Err(e.to_string()),
        Ok(_) => match connection.readiness().await {
            // What the check found, in its own words: a timeout is not a replica or an
            // eviction policy, and says after how long it gave up.
            Err(e) if e.is_timeout() => Err(format!(
                "{endpoint} answers PING, but the readiness check /readyz makes got no answer \
                 in time: {e} (session.redis_timeout)"
            )),
            Err(e) => Err(format!(
                "{endpoint} answers PING, but not the readiness check /readyz makes: {e}"
            )),
            Ok(()) => match connection.eviction_policy_summary().await {
                Ok(policy) if config.session.redis.cluster_nodes.is_some() => Ok(format!(
                    "connected, credentials accepted, {policy}, every primary answering"
                )),
                Ok(policy) => Ok(format!(
                    "connected, credentials accepted, {policy}, the writable primary"
                )),
                Err(e) => Err(e.to_string()),
            },
        },
    };
    Some(RedisCheck {
        key,
        endpoint,
        outcome,
    })
}

impl RedisSessionStore {
    /// Runs [`prune`](Self::prune) every `interval` with time from `clock`, so `count()` (the
    /// active-sessions metric) stays close to the live number between logins. Errors are
    /// left to the request path to report. Stops when the store is dropped.
    pub fn spawn_pruner(
        self: &Arc<Self>,
        interval: Duration,
        clock: SharedClock,
    ) -> tokio::task::JoinHandle<()> {
        super::session::spawn_periodic(self, interval, move |store| {
            let now = clock.now_unix();
            async move {
                if let Ok(removed) = store.prune(now).await {
                    if removed > 0 {
                        tracing::debug!(removed, "expired sessions pruned from the count index");
                    }
                }
            }
        })
    }
}

impl SessionStore for RedisSessionStore {
    fn create<'a>(
        &'a self,
        identity: &'a Identity,
        now: u64,
    ) -> BoxFuture<'a, Result<(SessionId, Session), StoreError>> {
        Box::pin(self.create_session(identity, None, now))
    }

    fn create_stamped<'a>(
        &'a self,
        identity: &'a Identity,
        stamp: Option<CredentialStamp>,
        now: u64,
    ) -> BoxFuture<'a, Result<(SessionId, Session), StoreError>> {
        Box::pin(self.create_session(identity, stamp, now))
    }

    fn get<'a>(
        &'a self,
        id: &'a SessionId,
        now: u64,
        touch: bool,
    ) -> BoxFuture<'a, Result<Option<Session>, StoreError>> {
        Box::pin(self.get_session(id, now, touch, None))
    }

    fn get_checked<'a>(
        &'a self,
        id: &'a SessionId,
        now: u64,
        touch: bool,
        users: Option<&'a UsersHandle>,
    ) -> BoxFuture<'a, Result<Option<Session>, StoreError>> {
        Box::pin(self.get_session(id, now, touch, users))
    }

    fn get_for_request_checked<'a>(
        &'a self,
        id: &'a SessionId,
        now: u64,
        touch: bool,
        users: Option<&'a UsersHandle>,
    ) -> Lookup<'a> {
        Lookup::Pending(Box::pin(async move {
            Ok(self
                .get_session(id, now, touch, users)
                .await?
                .map(RequestSession::from))
        }))
    }

    fn delete<'a>(&'a self, id: &'a SessionId) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.delete_session(id))
    }

    fn delete_user<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(self.delete_user_sessions(user))
    }

    fn count(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(self.count_sessions())
    }

    fn ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(self.connection.ping())
    }

    /// Sessions in Redis are judged by the new lifetimes at their next lookup (their record
    /// holds their login and last use): a shorter one ends them at once. A longer one keeps
    /// a session the old one would have ended only once a touch rewrote its key with the new
    /// TTL: a key's TTL was set at its last write, so a session left idle past its old expiry
    /// is gone from Redis. Proxies of a fleet on another file keep their own lifetimes.
    fn set_timeouts(&self, timeouts: SessionTimeouts) -> bool {
        self.timeouts.set(timeouts);
        true
    }

    /// Each login's script counts the user's sessions against the cap it is given, so the
    /// new cap applies to this proxy's next login; sessions held above a lowered one are kept
    /// until that user's next login ends the oldest. Proxies of a fleet on another file keep
    /// their own cap.
    fn set_max_sessions_per_user(&self, max: usize) -> bool {
        self.max_per_user.store(max.max(1), Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(session: &str) -> ProxyConfig {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://app.test\"\n\
             [session]\nstore = \"redis\"\n{session}\n\
             [auth]\nusers_file = \"users.toml\"\n[signing]\nkeyring = \"keys.toml\"\n\
             [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"http://127.0.0.1:3000\"\n"
        );
        ProxyConfig::parse(&text, Path::new("/nonexistent/proxy.toml")).expect("config")
    }

    fn connect(session: &str) -> Result<RedisConnection, ConfigError> {
        let config = config(session);
        let StoreKind::Redis { url, .. } = &config.session.store else {
            panic!("a redis store");
        };
        redis_connection(&config, url)
    }

    use super::super::config::StoreKind;

    /// The record as proxies before credential stamps wrote and read it.
    #[derive(Serialize, Deserialize)]
    struct RecordBeforeStamps {
        u: String,
        r: Vec<String>,
        c: String,
        ca: u64,
        ls: u64,
    }

    /// Both ways between versions: an older proxy reads a stamped record (ignoring `s`), this
    /// one reads an older record (no stamp), and a record without a stamp is written as
    /// before. A malformed stamp makes the record undecodable (no session), never a session
    /// without a stamp.
    #[test]
    fn records_with_and_without_a_stamp_decode_in_both_versions() {
        let stamp = CredentialStamp::from_bytes(*b"0123456789abcdef");
        let record = |s: Option<StoredStamp>| Record {
            u: "alice".into(),
            r: vec!["admin".into()],
            c: "token".into(),
            ca: 1,
            ls: 2,
            s,
            n: None,
        };
        let stamped = RedisSessionStore::encode(&record(Some(StoredStamp(stamp)))).unwrap();
        assert!(
            stamped.contains(r#""s":"MDEyMzQ1Njc4OWFiY2RlZg""#),
            "{stamped}"
        );
        let old: RecordBeforeStamps = serde_json::from_str(&stamped).unwrap();
        assert_eq!((old.u.as_str(), old.ls), ("alice", 2));
        let new: Record = serde_json::from_str(&stamped).unwrap();
        assert!(new
            .s
            .as_ref()
            .is_some_and(|StoredStamp(s)| s.matches(&stamp)));

        let unstamped = RedisSessionStore::encode(&record(None)).unwrap();
        let old_text = serde_json::to_string(&RecordBeforeStamps {
            u: "alice".into(),
            r: vec!["admin".into()],
            c: "token".into(),
            ca: 1,
            ls: 2,
        })
        .unwrap();
        assert_eq!(
            old_text, unstamped,
            "unstamped records are written as before"
        );
        assert!(serde_json::from_str::<Record>(&old_text)
            .unwrap()
            .s
            .is_none());

        let bad_stamps = [
            r#""""#,
            r#""MDEy""#,
            r#""MDEyMzQ1Njc4OWFiY2RlZg=""#,
            r#""MDEyMzQ1Njc4OWFiY2RlZg+""#,
            "1",
        ];
        for bad in bad_stamps {
            let text = old_text.replace('}', &format!(r#","s":{bad}}}"#));
            assert!(serde_json::from_str::<Record>(&text).is_err(), "{text}");
        }
    }

    /// The URLs `run` cannot use are refused here (and so by `check-config`), naming the key,
    /// saying what is accepted (not `redis+unix://`), never quoting the password.
    #[test]
    fn unusable_redis_urls_name_the_key_and_what_is_accepted() {
        for url in [
            "redis://127.0.0.1:notaport/0",
            "redis://127.0.0.1:6379/notadb",
            "redis://",
            "redis://127.0.0.1:/0",
            "redis://127.0.0.1:0/0",
            "redis://:S3cretPw@127.0.0.1:99999/0",
        ] {
            let err = connect(&format!("redis_url = \"{url}\"")).unwrap_err();
            let text = err.to_string();
            assert_eq!(err.key(), "session.redis_url", "{url}: {text}");
            assert!(text.contains(ACCEPTED_REDIS_URLS), "{url}: {text}");
            assert!(!text.contains("redis+unix"), "{url}: {text}");
            assert!(!text.contains("S3cretPw"), "{url}: {text}");
        }
        for url in [
            "redis://127.0.0.1",
            "redis://:pw@127.0.0.1:6379/3",
            "rediss://[::1]:6380/0",
        ] {
            let connection = connect(&format!("redis_url = \"{url}\"")).expect(url);
            assert!(!connection.endpoint().contains("pw"), "{url}");
        }
    }

    /// The CA file is read and parsed: a directory, an empty file or one without a PEM
    /// certificate is refused, naming `session.redis_ca_file`.
    #[test]
    fn unusable_ca_files_name_the_key() {
        let dir = std::env::temp_dir().join(format!("countersign-ca-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a-directory")).expect("temp dir");
        std::fs::write(dir.join("empty.pem"), "").expect("write");
        std::fs::write(dir.join("garbage.pem"), "garbage\n").expect("write");
        for name in ["missing.pem", "a-directory", "empty.pem", "garbage.pem"] {
            let file = dir.join(name);
            let session = format!(
                "redis_url = \"rediss://127.0.0.1:6380/0\"\nredis_ca_file = {:?}",
                file.display().to_string()
            );
            let err = connect(&session).unwrap_err();
            assert_eq!(err.key(), "session.redis_ca_file", "{name}: {err}");
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! [`RedisLoginThrottle`]: failed-login counters in Redis, so a password guesser is counted
//! across every proxy of the fleet, not per proxy.
//!
//! One counter per client address and one per user name, under a configurable prefix `P`:
//! - `P throttle:ip:<address>` — IPv4 as is, IPv6 by /64 prefix, IPv4-mapped IPv6 as IPv4
//!   (the same grouping as the memory throttle);
//! - `P throttle:user:<hex SHA-256(name as `folded_name` folds it: NFKC, trimmed, case-folded)>`;
//! - beside each counter, its window: `P throttle:window:ip:<address>` and
//!   `P throttle:window:user:<the same hex>`, expiring with the counter. They hold the second
//!   the window started (the admitting proxy's clock), so that `release` takes a count back
//!   only from the window the attempt was counted in, not from a later one of the same key;
//!   the user's also holds how the attempts of the window were spelled (the hex of the first
//!   16 bytes of SHA-256 of the name as typed, or `*` once two spellings were counted): a
//!   success clears the user counter only when every attempt was spelled as it was, since
//!   `alice` and `ALICE` can be two accounts of the users file sharing one counter, and the
//!   owner of one must not clear the failures counted against the other by logging in.
//!   A counter without its window (written by an older proxy) is released and cleared as
//!   before;
//! - per release, `P throttle:release:<32 hex digits, random>`, expiring after one window: the
//!   release's id, so that the release script takes its counts back once. The Redis connection
//!   runs a call again on a new connection when the first one's connection was found dead, and
//!   a release whose reply was lost with its connection had run: run again, it would take a
//!   second failure's count back (one guess more per dropped connection). Repeated, it finds
//!   its id and takes nothing.
//!
//! A failure is `INCR` + `EXPIRE window NX` per counter, in one script: the window starts at
//! the first failure and is not extended by later ones (a fixed window). `check` reads both
//! counters and their remaining time in one pipeline. `admit` is one Lua script (atomic on the
//! server, so attempts of the whole fleet in flight at once are counted one by one): it reads
//! both counters and, when neither is at its limit, counts the attempt on both; `release` takes
//! one count back from each counter that still exists and started no later than the attempt
//! was admitted. The window's length runs on Redis' clock (its TTLs); the `now` arguments only
//! date a window's start, which proxies of a fleet compare with their own admissions (clocks
//! apart by more than a login takes can leave one count too many, or take one back from a
//! later window). `EXPIRE .. NX` needs Redis 7.0 or later.
//!
//! The limits are read per call and can change while the proxy runs
//! ([`LoginThrottle::set_limits`], a reload): a limit applies at once, to the counts already
//! in Redis too (each call sends the limits it judges by); a window length applies to the
//! counters that start after the change (a counter's TTL was set when it started). Each proxy
//! of a fleet judges the shared counters by its own limits. `max_tracked_keys` does not apply
//! here (Redis' own memory limit does).
//!
//! Errors and timeouts are [`StoreError`]s: the login answers 503 and no password is checked
//! unthrottled while Redis is away.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use super::config::ThrottleConfig;
use super::session::{BoxFuture, StoreError};
use super::session_redis::hex;
use super::throttle::{folded_name, spelling_digest, LoginThrottle};
use crate::replay::RedisConnection;

/// `admit`: KEYS = ip counter, its window, user counter, its window; ARGV = ip limit, user
/// limit, window (s), spelling, now. Returns `{1, pttl_ms}` (at a limit: the longest wait of
/// the counters at theirs; nothing counted) or `{0, 0}` (admitted: both counted, a new window
/// started where there was none, dated `now` and, for the user, with the spelling, expiring
/// with its counter). A user window is `"<since> <spelling>"`, `*` for several spellings. A
/// window dated later than `now` (the clock stepped back) is dated `now`, so that the
/// attempt's release finds it (`RELEASE_SCRIPT` takes only from windows dated no later).
const ADMIT_SCRIPT: &str = r"
local limited, wait = 0, -1
for i = 1, 2 do
  local key = KEYS[2 * i - 1]
  local failures = tonumber(redis.call('GET', key) or '0')
  if failures >= tonumber(ARGV[i]) then
    limited = 1
    local pttl = redis.call('PTTL', key)
    if pttl > wait then wait = pttl end
  end
end
if limited == 1 then return {1, wait} end
redis.call('INCR', KEYS[1])
if redis.call('EXPIRE', KEYS[1], ARGV[3], 'NX') == 1 then
  redis.call('SET', KEYS[2], ARGV[5], 'PX', redis.call('PTTL', KEYS[1]))
else
  local since = tonumber(redis.call('GET', KEYS[2]) or '')
  if since and since > tonumber(ARGV[5]) then redis.call('SET', KEYS[2], ARGV[5], 'KEEPTTL') end
end
redis.call('INCR', KEYS[3])
local fresh = redis.call('EXPIRE', KEYS[3], ARGV[3], 'NX') == 1
local window = redis.call('GET', KEYS[4])
if fresh or not window then
  local since = ARGV[5]
  if not fresh then since = '0' end
  redis.call('SET', KEYS[4], since .. ' ' .. ARGV[4], 'PX', redis.call('PTTL', KEYS[3]))
else
  local since, seen = string.match(window, '^(%d+) (.*)$')
  if since then
    local dated, spelled = since, seen
    if tonumber(since) > tonumber(ARGV[5]) then dated = ARGV[5] end
    if seen ~= ARGV[4] and seen ~= '*' then spelled = '*' end
    if dated ~= since or spelled ~= seen then
      redis.call('SET', KEYS[4], dated .. ' ' .. spelled, 'KEEPTTL')
    end
  end
end
return {0, 0}
";

/// `record_success`: KEYS = user counter, its window; ARGV = spelling. Both deleted when every
/// attempt of the window was spelled so (or the counter has no window: an older proxy's);
/// else kept.
const SUCCESS_SCRIPT: &str = r"
local window = redis.call('GET', KEYS[2])
local seen = window and string.match(window, '^%d+ (.*)$')
if (not window) or seen == ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
end
return 0
";

/// `release`: KEYS = ip counter, its window, user counter, its window, the release's id;
/// ARGV = when the attempt was admitted, the window (ms). Nothing when the id is already there
/// (this release ran before: a call repeated on a new connection after its reply was lost);
/// else the id is kept for a window and one count taken back from each counter that still
/// exists and whose window started no later (`DECR` keeps the key's TTL; a counter whose
/// window ended is gone, or a later one, and left alone; one without a window, an older
/// proxy's, is taken from as before). A counter taken back to 0 is deleted with its window:
/// the next failure starts a window of its own, as one from the first failure.
const RELEASE_SCRIPT: &str = r"
if not redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[2]) then return 0 end
local admitted = tonumber(ARGV[1])
for i = 1, 2 do
  local window = redis.call('GET', KEYS[2 * i])
  local since = tonumber(window and string.match(window, '^(%d+)') or '0') or 0
  local failures = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  if failures > 0 and since <= admitted then
    if redis.call('DECR', KEYS[2 * i - 1]) <= 0 then redis.call('DEL', KEYS[2 * i - 1], KEYS[2 * i]) end
  end
end
return 0
";

/// A [`LoginThrottle`] whose counters live in Redis.
#[derive(Clone)]
pub struct RedisLoginThrottle {
    connection: RedisConnection,
    /// The limits now, swapped whole by [`LoginThrottle::set_limits`] (clones share them).
    config: Arc<ArcSwap<ThrottleConfig>>,
    ip_prefix: String,
    user_prefix: String,
    /// Prefix of the counters' windows (`... throttle:window:`), then `ip:` or `user:`.
    window_prefix: String,
    /// Prefix of the releases' ids (`... throttle:release:`).
    release_prefix: String,
}

impl fmt::Debug for RedisLoginThrottle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLoginThrottle")
            .field("connection", &self.connection)
            .field("config", &**self.config.load())
            .field("ip_prefix", &self.ip_prefix)
            .finish_non_exhaustive()
    }
}

/// The address part of an ip key: IPv4 dotted, IPv6 as its /64 prefix.
fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// Seconds to wait given a key's remaining time in milliseconds (`PTTL`: -1 = no expiry,
/// -2 = gone), rounded up, at least one.
fn wait_secs(pttl_ms: i64, window_secs: u64) -> u64 {
    if pttl_ms < 0 {
        // No expiry should not happen (INCR and EXPIRE are one transaction); assume a whole
        // window rather than "try again now".
        return window_secs.max(1);
    }
    (pttl_ms.unsigned_abs().div_ceil(1000)).max(1)
}

impl RedisLoginThrottle {
    /// A throttle on `connection` with keys under `key_prefix` and these limits.
    pub fn new(connection: RedisConnection, key_prefix: &str, config: ThrottleConfig) -> Self {
        RedisLoginThrottle {
            connection,
            config: Arc::new(ArcSwap::from_pointee(config)),
            ip_prefix: format!("{key_prefix}throttle:ip:"),
            user_prefix: format!("{key_prefix}throttle:user:"),
            window_prefix: format!("{key_prefix}throttle:window:"),
            release_prefix: format!("{key_prefix}throttle:release:"),
        }
    }

    /// The limits one call judges by (all from one version).
    fn limits(&self) -> ThrottleConfig {
        **self.config.load()
    }

    fn ip_key(&self, ip: IpAddr) -> String {
        self.ip_keys(ip).0
    }

    /// The address counter's key and the key of its window beside it.
    fn ip_keys(&self, ip: IpAddr) -> (String, String) {
        let address = address_key(ip);
        (
            format!("{}{address}", self.ip_prefix),
            format!("{}ip:{address}", self.window_prefix),
        )
    }

    /// The user counter's key and the key of its window beside it.
    fn user_keys(&self, user: &str) -> (String, String) {
        let digest = hex(&Sha256::digest(folded_name(user).as_bytes()));
        (
            format!("{}{digest}", self.user_prefix),
            format!("{}user:{digest}", self.window_prefix),
        )
    }

    fn user_key(&self, user: &str) -> String {
        self.user_keys(user).0
    }

    /// The four keys of an attempt: ip counter, its window, user counter, its window.
    fn attempt_keys(&self, ip: IpAddr, user: &str) -> [String; 4] {
        let (ip_key, ip_window) = self.ip_keys(ip);
        let (user_key, user_window) = self.user_keys(user);
        [ip_key, ip_window, user_key, user_window]
    }

    async fn check_keys(&self, ip: IpAddr, user: &str) -> Result<Option<u64>, StoreError> {
        let (ip_key, user_key) = (self.ip_key(ip), self.user_key(user));
        let mut pipe = ::redis::pipe();
        pipe.cmd("GET")
            .arg(&ip_key)
            .cmd("PTTL")
            .arg(&ip_key)
            .cmd("GET")
            .arg(&user_key)
            .cmd("PTTL")
            .arg(&user_key);
        let (ip_failures, ip_pttl, user_failures, user_pttl): (Option<u64>, i64, Option<u64>, i64) =
            self.connection
                .query_pipe(&pipe)
                .await
                .map_err(|e| StoreError::new(e.to_string()))?;
        let limits = self.limits();
        let window = limits.window_secs();
        let by_ip = (ip_failures.unwrap_or(0) >= u64::from(limits.max_failures_per_ip))
            .then(|| wait_secs(ip_pttl, window));
        let by_user = (user_failures.unwrap_or(0) >= u64::from(limits.max_failures_per_user))
            .then(|| wait_secs(user_pttl, window));
        Ok(by_ip.max(by_user))
    }

    async fn admit_keys(
        &self,
        ip: IpAddr,
        user: &str,
        now: u64,
    ) -> Result<Option<u64>, StoreError> {
        let limits = self.limits();
        self.admit_within(
            ip,
            user,
            now,
            limits.max_failures_per_ip,
            limits.max_failures_per_user,
        )
        .await
    }

    /// [`ADMIT_SCRIPT`] with these limits (`u32::MAX`: counts without judging).
    async fn admit_within(
        &self,
        ip: IpAddr,
        user: &str,
        now: u64,
        per_ip: u32,
        per_user: u32,
    ) -> Result<Option<u64>, StoreError> {
        let window = self.limits().window_secs();
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(ADMIT_SCRIPT)
            .arg(4)
            .arg(&self.attempt_keys(ip, user)[..])
            .arg(per_ip)
            .arg(per_user)
            .arg(window)
            .arg(hex(&spelling_digest(user)))
            .arg(now);
        let (limited, pttl_ms): (i64, i64) = self
            .connection
            .query(&cmd)
            .await
            .map_err(|e| StoreError::new(e.to_string()))?;
        Ok((limited != 0).then(|| wait_secs(pttl_ms, window)))
    }

    async fn release_keys(
        &self,
        ip: IpAddr,
        user: &str,
        admitted_at: u64,
    ) -> Result<(), StoreError> {
        // A fresh id per release, in the command itself: the connection's retry sends the same
        // command, so a repeat finds the id its first run left and takes nothing back.
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let window_ms = self.limits().window_secs().saturating_mul(1000);
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(RELEASE_SCRIPT)
            .arg(5)
            .arg(&self.attempt_keys(ip, user)[..])
            .arg(format!("{}{}", self.release_prefix, hex(&id)))
            .arg(admitted_at)
            .arg(window_ms);
        self.connection
            .query::<()>(&cmd)
            .await
            .map_err(|e| StoreError::new(e.to_string()))
    }

    async fn count_failure(&self, ip: IpAddr, user: &str, now: u64) -> Result<(), StoreError> {
        // No limit reached at u32::MAX: the script only counts (and dates the windows).
        self.admit_within(ip, user, now, u32::MAX, u32::MAX)
            .await
            .map(|_| ())
    }

    async fn clear_user(&self, user: &str) -> Result<(), StoreError> {
        let (user_key, user_window) = self.user_keys(user);
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(SUCCESS_SCRIPT)
            .arg(2)
            .arg(user_key)
            .arg(user_window)
            .arg(hex(&spelling_digest(user)));
        self.connection
            .query::<()>(&cmd)
            .await
            .map_err(|e| StoreError::new(e.to_string()))
    }
}

impl LoginThrottle for RedisLoginThrottle {
    fn admit<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        now: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(self.admit_keys(ip, user, now))
    }

    fn release<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        admitted_at: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.release_keys(ip, user, admitted_at))
    }

    fn check<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        _now: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(self.check_keys(ip, user))
    }

    fn record_failure<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        now: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.count_failure(ip, user, now))
    }

    /// Clears the user's counter, not the address's (as the memory throttle: otherwise an
    /// attacker could reset their address counter by logging in to an account of their own),
    /// and only when every attempt of its window was spelled as this one (`SUCCESS_SCRIPT`).
    fn record_success<'a>(
        &'a self,
        _ip: IpAddr,
        user: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.clear_user(user))
    }

    fn set_limits(&self, limits: ThrottleConfig) {
        self.config.store(Arc::new(limits));
    }
}

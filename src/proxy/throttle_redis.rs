//! [`RedisLoginThrottle`]: failed-login counters in Redis, so a password guesser is counted
//! across every proxy of the fleet, not per proxy.
//!
//! One counter per client address and one per user name, under a configurable prefix `P`:
//! - `P throttle:ip:<address>` — IPv4 as is, IPv6 by /64 prefix, IPv4-mapped IPv6 as IPv4
//!   (the same grouping as the memory throttle);
//! - `P throttle:user:<hex SHA-256(lower-cased name)>`.
//!
//! A failure is one atomic pipeline `INCR` + `EXPIRE window NX` per key: the window starts at
//! the first failure and is not extended by later ones (a fixed window). `check` reads both
//! counters and their remaining time in one pipeline. `admit` is one Lua script (atomic on the
//! server, so attempts of the whole fleet in flight at once are counted one by one): it reads
//! both counters and, when neither is at its limit, counts the attempt on both; `release` takes
//! one count back from each counter that still exists. The window runs on Redis' clock (its
//! TTLs), so the `now` arguments are not used. `EXPIRE .. NX` needs Redis 7.0 or later.
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
use sha2::{Digest as _, Sha256};

use super::config::ThrottleConfig;
use super::session::{BoxFuture, StoreError};
use super::session_redis::hex;
use super::throttle::LoginThrottle;
use crate::replay::RedisConnection;

/// `admit`: KEYS = ip key, user key; ARGV = ip limit, user limit, window (s). Returns
/// `{1, pttl_ms}` (at a limit: the longest wait of the counters at theirs; nothing counted) or
/// `{0, 0}` (admitted: both counted, a new window started where there was none).
const ADMIT_SCRIPT: &str = r"
local limited, wait = 0, -1
for i = 1, 2 do
  local failures = tonumber(redis.call('GET', KEYS[i]) or '0')
  if failures >= tonumber(ARGV[i]) then
    limited = 1
    local pttl = redis.call('PTTL', KEYS[i])
    if pttl > wait then wait = pttl end
  end
end
if limited == 1 then return {1, wait} end
for i = 1, 2 do
  redis.call('INCR', KEYS[i])
  redis.call('EXPIRE', KEYS[i], ARGV[3], 'NX')
end
return {0, 0}
";

/// `release`: KEYS = ip key, user key. One count back from each that still exists (`DECR`
/// keeps the key's TTL; a counter whose window ended is gone and left alone).
const RELEASE_SCRIPT: &str = r"
for i = 1, 2 do
  local failures = tonumber(redis.call('GET', KEYS[i]) or '0')
  if failures > 0 then redis.call('DECR', KEYS[i]) end
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
        }
    }

    /// The limits one call judges by (all from one version).
    fn limits(&self) -> ThrottleConfig {
        **self.config.load()
    }

    fn ip_key(&self, ip: IpAddr) -> String {
        format!("{}{}", self.ip_prefix, address_key(ip))
    }

    fn user_key(&self, user: &str) -> String {
        let digest = Sha256::digest(user.to_lowercase().as_bytes());
        format!("{}{}", self.user_prefix, hex(&digest))
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

    async fn admit_keys(&self, ip: IpAddr, user: &str) -> Result<Option<u64>, StoreError> {
        let limits = self.limits();
        let window = limits.window_secs();
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(ADMIT_SCRIPT)
            .arg(2)
            .arg(self.ip_key(ip))
            .arg(self.user_key(user))
            .arg(limits.max_failures_per_ip)
            .arg(limits.max_failures_per_user)
            .arg(window);
        let (limited, pttl_ms): (i64, i64) = self
            .connection
            .query(&cmd)
            .await
            .map_err(|e| StoreError::new(e.to_string()))?;
        Ok((limited != 0).then(|| wait_secs(pttl_ms, window)))
    }

    async fn release_keys(&self, ip: IpAddr, user: &str) -> Result<(), StoreError> {
        let mut cmd = ::redis::cmd("EVAL");
        cmd.arg(RELEASE_SCRIPT)
            .arg(2)
            .arg(self.ip_key(ip))
            .arg(self.user_key(user));
        self.connection
            .query::<()>(&cmd)
            .await
            .map_err(|e| StoreError::new(e.to_string()))
    }

    async fn count_failure(&self, ip: IpAddr, user: &str) -> Result<(), StoreError> {
        let window = self.limits().window_secs();
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        for key in [self.ip_key(ip), self.user_key(user)] {
            pipe.cmd("INCR")
                .arg(&key)
                .ignore()
                .cmd("EXPIRE")
                .arg(&key)
                .arg(window)
                .arg("NX")
                .ignore();
        }
        self.connection
            .query_pipe::<()>(&pipe)
            .await
            .map_err(|e| StoreError::new(e.to_string()))
    }

    async fn clear_user(&self, user: &str) -> Result<(), StoreError> {
        let mut cmd = ::redis::cmd("DEL");
        cmd.arg(self.user_key(user));
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
        _now: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(self.admit_keys(ip, user))
    }

    fn release<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        _admitted_at: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.release_keys(ip, user))
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
        _now: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.count_failure(ip, user))
    }

    /// Clears the user's counter, not the address's (as the memory throttle: otherwise an
    /// attacker could reset their address counter by logging in to an account of their own).
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

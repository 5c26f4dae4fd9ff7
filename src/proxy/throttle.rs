//! Login throttling: a fixed window per client address and per user name, counting failed
//! logins. While either count is at its limit, logins from that address or for that name are
//! refused with `Retry-After` until the window ends.
//!
//! - Addresses: IPv4 as is; IPv6 by /64 prefix (one client usually holds a whole /64, so
//!   counting single v6 addresses would let it rotate freely); IPv4-mapped v6 as IPv4.
//! - Names are counted in NFKC form, without surrounding white space and case-folded
//!   (`folded_name`: `ß` as `ss`, `ς` as `σ`, `İ` and `ı` as `i`), and kept only as a SHA-256, so long names cost no memory. A `verify_url`
//!   API may well normalise or trim the names it gets (or compare them padded, as SQL
//!   `PAD SPACE` collations do): counted as typed, `alice`, `alice `, `ａｌｉｃｅ`... would
//!   each get the whole per-name limit.
//! - Memory is bounded by `max_tracked_keys`. Keys whose window has ended are dropped first;
//!   when the table is still full, `check` fails closed with a [`StoreError`] (the login
//!   answers 503) rather than forgetting live counters, which would let an attacker who fills
//!   the table guess passwords unthrottled.
//! - A successful login clears the user's counter, not the address's: otherwise an attacker
//!   could reset their address counter by logging in to an account of their own. And only when
//!   every attempt counted in the name's window was spelled exactly as the successful one
//!   (`Spelling`): names are counted case-folded, but the users file's names are exact, so
//!   `alice` and `ALICE` (or `karen` and `\u{212A}aren`, a KELVIN SIGN) can be two accounts
//!   sharing one counter, and a login to the attacker's own twin must not clear the failures
//!   counted against the victim.
//! - A login is admitted and counted in one step ([`LoginThrottle::admit`]): every attempt is
//!   counted as a failure *before* its password is checked, and the count is taken back when it
//!   turns out not to be one. Checking first and counting after the password check let as many
//!   guesses through as an attacker could have in flight at once (all of them passed the check
//!   while the first was still being hashed).
//! - The limits can change while the proxy runs ([`LoginThrottle::set_limits`], a reload of an
//!   edited `[auth.throttle]`): a limit applies at once, to the counts already made in the
//!   current window too; a window length applies to the windows that start after the change
//!   (each counter keeps the end it started with, as a Redis TTL does), so shortening it forgets
//!   no count early; `max_tracked_keys` applies at once (lowered below the keys tracked: no new
//!   key until ended windows make room, the fail-closed answer of a full table).

use std::collections::HashMap;
use std::net::IpAddr;

use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};

use super::config::ThrottleConfig;
use super::session::{BoxFuture, StoreError};

/// Decides whether a login attempt may proceed.
pub trait LoginThrottle: Send + Sync + 'static {
    /// Admits one login attempt: `Some(retry_after_secs)` if this ip or user is at its limit
    /// (nothing counted), else `None`, with the attempt already counted as a failure for both,
    /// in the same atomic step. The caller then either keeps that count (the password was
    /// wrong), or calls [`release`](Self::release) (the password was not checked, or was
    /// right).
    fn admit<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        now: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>>;
    /// Takes back the count of one attempt admitted at `admitted_at` for this ip and user (a
    /// count whose window has since ended is left alone).
    fn release<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        admitted_at: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Some(retry_after_secs) if this ip or user is currently throttled (reads only).
    fn check<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        now: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>>;
    /// Counts a failed login for this ip and user.
    fn record_failure<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        now: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// A successful login: clears the user's counter, unless an attempt of its window was
    /// spelled differently (another account may share the case-folded name).
    fn record_success<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Applies new limits from the next call on (a reload of an edited `[auth.throttle]`):
    /// `max_failures_per_*` to the counts already made in the current window too, `window` to
    /// the windows that start from now on (a window running keeps its end).
    fn set_limits(&self, limits: ThrottleConfig);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ThrottleKey {
    V4([u8; 4]),
    V6Prefix([u8; 8]),
    User([u8; 32]),
}

impl ThrottleKey {
    fn ip(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => ThrottleKey::V4(v4.octets()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ThrottleKey::V4(v4.octets()),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    ThrottleKey::V6Prefix(prefix)
                }
            },
        }
    }

    fn user(name: &str) -> Self {
        ThrottleKey::User(Sha256::digest(folded_name(name).as_bytes()).into())
    }
}

/// A user name as the throttle counts it: in its NFKC form (compatibility characters as the
/// letters they stand for: fullwidth `ａ`, the KELVIN SIGN, ligatures such as `ﬁ`), without
/// surrounding white space (Unicode's), control characters or U+FEFF, case-folded (below).
/// Spellings that a credential check may take for the same account (a `verify_url` API that
/// normalises, trims or compares names case-insensitively) share one counter; names that are
/// two accounts of the users file then share it too, which only throttles sooner (and
/// [`Spelling`] keeps a success of one from clearing the other's count).
pub(crate) fn folded_name(name: &str) -> String {
    let nfkc = icu_normalizer::ComposingNormalizerBorrowed::new_nfkc();
    let normalized = nfkc.normalize(name);
    // Lower-casing alone keeps apart what case-insensitive comparisons join: `ß` and `ss`
    // (`SS` in upper case, `ẞ` its capital), `σ` and the final `ς` (both `Σ`), and Java's
    // `equalsIgnoreCase` takes `ı` and `İ` for `i`. Lower, upper, lower again joins them (and
    // every pair Unicode case folding joins); NFKC again recomposes what the mappings took
    // apart. ASCII names fold as before.
    // Trimmed as the widest common trims trim: Unicode white space (Rust, .NET), and also
    // U+FEFF (JavaScript's `trim`) and the control characters (Java's `String.trim` drops
    // everything up to U+0020, Python's `strip` U+001C..U+001F). Only white space was trimmed,
    // so `\u{FEFF}alice` or `\u{1}alice` bought a fresh per-user limit against an API that
    // trims them off: thousands of spellings of one account.
    let dotted: String = normalized
        .trim_matches(|c: char| c.is_whitespace() || c.is_control() || c == '\u{FEFF}')
        .chars()
        .map(|c| if c == '\u{130}' { 'I' } else { c })
        .collect();
    let cased = dotted.to_lowercase().to_uppercase().to_lowercase();
    nfkc.normalize(&cased).into_owned()
}

/// The exact spelling of a user name, as typed (not lower-cased): the first 16 bytes of its
/// SHA-256. Several spellings share one counter (the counter is case-insensitive); a success
/// clears the counter only when every attempt of its window was spelled as the success was.
pub(crate) fn spelling_digest(name: &str) -> [u8; 16] {
    let digest = Sha256::digest(name.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The spellings of the attempts counted in one user name's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    /// None yet (and always for an address).
    Unseen,
    /// Every attempt so far was spelled this way.
    One([u8; 16]),
    /// At least two different spellings (`alice` and `ALICE`): possibly two accounts, so a
    /// success of either clears nothing.
    Mixed,
}

impl Spelling {
    fn with(self, spelled: [u8; 16]) -> Self {
        match self {
            Spelling::Unseen => Spelling::One(spelled),
            Spelling::One(seen) if seen == spelled => self,
            Spelling::One(_) | Spelling::Mixed => Spelling::Mixed,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Window {
    /// The earliest admission counted in it (its start, unless the clock stepped back).
    started: u64,
    /// `started` plus the window length when it started: a later change of the length applies
    /// to the next window of this key, not to this one.
    ends: u64,
    failures: u32,
    /// User names only: how the attempts counted in this window were spelled.
    spelling: Spelling,
}

impl Window {
    fn starting(now: u64, window_secs: u64) -> Self {
        Window {
            started: now,
            ends: now.saturating_add(window_secs),
            failures: 0,
            spelling: Spelling::Unseen,
        }
    }
}

/// In-process [`LoginThrottle`].
#[derive(Debug)]
pub struct MemoryLoginThrottle {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The limits now: read and changed under the lock the counters are, so an attempt is
    /// judged by one set of limits.
    config: ThrottleConfig,
    windows: HashMap<ThrottleKey, Window>,
    /// When ended windows were last dropped (pruning scans the table, so at most once a
    /// second, however many attempts arrive while it is full).
    last_prune: u64,
}

impl State {
    /// At least two: one attempt counts an address and a name.
    fn max_tracked_keys(&self) -> usize {
        self.config.max_tracked_keys.max(2)
    }

    /// Makes room for `needed` new keys if possible.
    fn has_room(&mut self, needed: usize, now: u64) -> bool {
        let max = self.max_tracked_keys();
        if self.windows.len() + needed <= max {
            return true;
        }
        // Once per second of the clock, whichever way it went: after a backward step,
        // `now > last_prune` would hold no prune until the clock caught up with the later
        // second, and a full table of ended windows refused every new address or name (503)
        // until then (the session store's reclaim had the same fix).
        if now != self.last_prune {
            self.last_prune = now;
            self.windows.retain(|_, w| now < w.ends);
        }
        self.windows.len() + needed <= max
    }
}

/// Seconds until `key` may try again, if it is at its limit.
fn retry_after(
    windows: &HashMap<ThrottleKey, Window>,
    key: &ThrottleKey,
    limit: u32,
    now: u64,
) -> Option<u64> {
    let window = windows.get(key)?;
    (now < window.ends && window.failures >= limit).then(|| (window.ends - now).max(1))
}

impl MemoryLoginThrottle {
    /// A throttle with these limits tracking at most `max_tracked_keys` addresses and names
    /// (`config.max_tracked_keys` is replaced by it).
    pub fn new(config: ThrottleConfig, max_tracked_keys: usize) -> Self {
        MemoryLoginThrottle {
            state: Mutex::new(State {
                config: ThrottleConfig {
                    max_tracked_keys,
                    ..config
                },
                windows: HashMap::new(),
                last_prune: 0,
            }),
        }
    }

    fn check_sync(&self, ip: IpAddr, user: &str, now: u64) -> Result<Option<u64>, StoreError> {
        let mut state = self.state.lock();
        self.limited(&mut state, ip, user, now)
    }

    /// Some(wait) if `ip` or `user` is at its limit; an error if their failure could not be
    /// counted (the table is full).
    fn limited(
        &self,
        state: &mut State,
        ip: IpAddr,
        user: &str,
        now: u64,
    ) -> Result<Option<u64>, StoreError> {
        let (ip_key, user_key) = (ThrottleKey::ip(ip), ThrottleKey::user(user));
        let (windows, config) = (&state.windows, &state.config);
        let by_ip = retry_after(windows, &ip_key, config.max_failures_per_ip, now);
        let by_user = retry_after(windows, &user_key, config.max_failures_per_user, now);
        if let Some(wait) = by_ip.max(by_user) {
            return Ok(Some(wait));
        }
        // Room for this attempt's failure to be counted? Otherwise refuse (fail closed).
        let needed = usize::from(!windows.contains_key(&ip_key))
            + usize::from(!windows.contains_key(&user_key));
        if !state.has_room(needed, now) {
            return Err(full(state));
        }
        Ok(None)
    }

    fn admit_sync(&self, ip: IpAddr, user: &str, now: u64) -> Result<Option<u64>, StoreError> {
        // One lock for both steps: attempts in flight at once are counted one by one.
        let mut state = self.state.lock();
        if let Some(wait) = self.limited(&mut state, ip, user, now)? {
            return Ok(Some(wait));
        }
        self.count_failure(&mut state, ip, user, now)?;
        Ok(None)
    }

    fn release_sync(&self, ip: IpAddr, user: &str, admitted_at: u64) {
        let mut state = self.state.lock();
        for key in [ThrottleKey::ip(ip), ThrottleKey::user(user)] {
            if let Some(window) = state.windows.get_mut(&key) {
                // Only the window the attempt was counted in (a later one never held it).
                if window.started <= admitted_at {
                    window.failures = window.failures.saturating_sub(1);
                    // No failure left in it: the window is dropped, so the next failure
                    // starts its own (a fixed window from the first failure, as documented;
                    // kept, a success or a check that erred would have dated it).
                    if window.failures == 0 {
                        state.windows.remove(&key);
                    }
                }
            }
        }
    }

    fn record_failure_sync(&self, ip: IpAddr, user: &str, now: u64) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        self.count_failure(&mut state, ip, user, now)
    }

    fn count_failure(
        &self,
        state: &mut State,
        ip: IpAddr,
        user: &str,
        now: u64,
    ) -> Result<(), StoreError> {
        let keys = [ThrottleKey::ip(ip), ThrottleKey::user(user)];
        let needed = keys
            .iter()
            .filter(|k| !state.windows.contains_key(k))
            .count();
        if !state.has_room(needed, now) {
            return Err(full(state));
        }
        let window_secs = state.config.window_secs();
        let spelled = spelling_digest(user);
        for key in keys {
            let window = (state.windows)
                .entry(key)
                .or_insert_with(|| Window::starting(now, window_secs));
            if now >= window.ends {
                *window = Window::starting(now, window_secs);
            }
            // After a backward clock step an attempt is counted in a window dated later than
            // it: the window's date goes back with it, or its release (which takes a count
            // back only from a window dated no later than the attempt) would be skipped.
            window.started = window.started.min(now);
            window.failures = window.failures.saturating_add(1);
            if matches!(key, ThrottleKey::User(_)) {
                window.spelling = window.spelling.with(spelled);
            }
        }
        Ok(())
    }

    /// A successful login of `user`: its name's counter is cleared if every attempt counted in
    /// its window was spelled exactly so (else another account sharing the counter may have
    /// failed there, and its failures stay).
    fn record_success_sync(&self, user: &str) {
        let key = ThrottleKey::user(user);
        let spelled = spelling_digest(user);
        let mut state = self.state.lock();
        if let Some(window) = state.windows.get(&key) {
            if matches!(window.spelling, Spelling::Unseen)
                || window.spelling == Spelling::One(spelled)
            {
                state.windows.remove(&key);
            }
        }
    }

    /// Number of addresses and names currently tracked.
    pub fn tracked_keys(&self) -> usize {
        self.state.lock().windows.len()
    }
}

impl LoginThrottle for MemoryLoginThrottle {
    fn admit<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        now: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(std::future::ready(self.admit_sync(ip, user, now)))
    }

    fn release<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        admitted_at: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.release_sync(ip, user, admitted_at);
        Box::pin(std::future::ready(Ok(())))
    }

    fn check<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        now: u64,
    ) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(std::future::ready(self.check_sync(ip, user, now)))
    }

    fn record_failure<'a>(
        &'a self,
        ip: IpAddr,
        user: &'a str,
        now: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(std::future::ready(self.record_failure_sync(ip, user, now)))
    }

    fn record_success<'a>(
        &'a self,
        _ip: IpAddr,
        user: &'a str,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.record_success_sync(user);
        Box::pin(std::future::ready(Ok(())))
    }

    fn set_limits(&self, limits: ThrottleConfig) {
        self.state.lock().config = limits;
    }
}

fn full(state: &State) -> StoreError {
    StoreError::new(format!(
        "login throttle is full (max_tracked_keys = {})",
        state.max_tracked_keys()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(per_user: u32, window_secs: u64, max_tracked_keys: usize) -> ThrottleConfig {
        ThrottleConfig {
            max_failures_per_ip: 1000,
            max_failures_per_user: per_user,
            window: Duration::from_secs(window_secs),
            max_tracked_keys,
        }
    }

    /// Spellings a credential check may take for one account share a counter: case, white
    /// space around the name, and compatibility characters (NFKC).
    #[test]
    fn names_are_counted_folded() {
        for spelled in [
            "alice",
            "ALICE",
            " Alice\t",
            "\u{3000}alice",
            "\u{FF41}\u{FF4C}\u{FF49}\u{FF43}\u{FF45}",
            "\u{FF21}lice",
            // What JavaScript's and Java's trims drop besides white space.
            "\u{FEFF}alice",
            "alice\u{FEFF}",
            "\u{1}alice",
            "alice\u{1F}",
            "\u{0}\u{8}alice\u{7F}",
        ] {
            assert_eq!(folded_name(spelled), "alice", "{spelled:?}");
            assert_eq!(ThrottleKey::user(spelled), ThrottleKey::user("alice"));
        }
        assert_eq!(folded_name("\u{212A}aren"), "karen", "KELVIN SIGN");
        assert_eq!(folded_name("\u{FB01}ona"), "fiona", "ligature fi");
        // Inside the name, white space is kept: `al ice` is another name.
        assert_eq!(folded_name("al ice"), "al ice");
        assert_ne!(ThrottleKey::user("al ice"), ThrottleKey::user("alice"));
        // The exact spelling is still told apart (a success clears only its own).
        assert_ne!(spelling_digest("ALICE"), spelling_digest("alice"));
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    /// `max_tracked_keys` set while running: lowered below the keys tracked, no counter is
    /// dropped and a new key is refused (fail closed) until ended windows make room; raised,
    /// new keys are counted again.
    #[test]
    fn a_changed_max_tracked_keys_applies_without_dropping_counters() {
        let throttle = MemoryLoginThrottle::new(limits(5, 60, 100), 100);
        for n in 0..3 {
            assert_eq!(throttle.admit_sync(ip(n), "u", 0).ok(), Some(None));
        }
        assert_eq!(throttle.tracked_keys(), 4);
        throttle.set_limits(limits(5, 60, 4));
        assert!(throttle.admit_sync(ip(9), "u", 1).is_err());
        assert!(throttle.admit_sync(ip(0), "v", 1).is_err());
        // Known keys are still counted and judged: the lowered limit holds for them.
        assert_eq!(throttle.admit_sync(ip(0), "u", 1).ok(), Some(None));
        throttle.set_limits(limits(4, 60, 4));
        assert_eq!(throttle.admit_sync(ip(1), "u", 2).ok(), Some(Some(58)));
        assert_eq!(throttle.tracked_keys(), 4);
        throttle.set_limits(limits(4, 60, 6));
        assert_eq!(throttle.admit_sync(ip(9), "w", 3).ok(), Some(None));
        assert_eq!(throttle.tracked_keys(), 6);
        // Lowered again: once their windows ended, the old keys make room.
        throttle.set_limits(limits(4, 60, 2));
        assert!(throttle.admit_sync(ip(8), "x", 59).is_err());
        assert_eq!(throttle.admit_sync(ip(8), "x", 64).ok(), Some(None));
        assert_eq!(throttle.tracked_keys(), 2);
    }
}

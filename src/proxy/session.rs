//! Server-side sessions: random ids handed to the browser as a cookie, the [`SessionStore`]
//! trait the request path talks to, and [`MemorySessionStore`], the in-process implementation.
//!
//! Security properties:
//! - A session id is 256 bits from the OS CSPRNG; the cookie carries it as base64url (no
//!   padding). `SessionId`'s `Debug` is redacted and its bytes are zeroized on drop.
//! - The store never holds an id, only its SHA-256: a dump of the store (or of a Redis server
//!   later) cannot be replayed as cookies.
//! - Each session has its own 256-bit CSRF token, compared in constant time.
//! - Idle and absolute timeouts are evaluated against the `now` the caller passes, so tests
//!   can move time; `get(.., touch = false)` never extends a session.
//!
//! The memory store is built for a million sessions in well under 300 MiB and a cheap lookup
//! on every proxied request:
//! - 16 shards, each behind its own `RwLock`; a lookup takes a read lock, and touching a
//!   session is an atomic store, so concurrent requests never wait for each other.
//! - A session is a fixed-size slot in the shard's slab (hash, CSRF token, two timestamps,
//!   list links); the index maps a 128-bit hash prefix to a slot number; the user name and
//!   roles are one `Arc<str>` shared by that identity's sessions.
//! - Per-user lists (linked through the slots) make `delete_user` O(that user's sessions).
//! - A per-shard expiry queue makes sweeping O(sessions due), not a scan of all sessions.
//! - The capacity is reserved before insertion: a full store refuses, never evicts.
//! - `max_sessions_per_user`: a login of a user who already holds that many live sessions ends
//!   that user's oldest ones (by login time, then login order) first. Logins of one user are
//!   serialised by a striped lock (`user_locks`), so concurrent logins cannot exceed the cap.

use std::borrow::Borrow;
use std::cmp::Ordering as CmpOrdering;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher as _;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use compact_str::CompactString;
use parking_lot::{Mutex, RwLock};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::users::{CredentialStamp, UsersHandle};
use crate::clock::SharedClock;
use crate::core::{
    decode_roles, decode_value, encode_roles, encode_value, EncodedIdentity, Identity,
};

/// A boxed, sendable future: what the async trait methods of the stores return, so the traits
/// stay dyn-compatible (`Arc<dyn SessionStore>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Length of a session id and of a CSRF token, in bytes (256 bits).
pub const TOKEN_BYTES: usize = 32;

/// Length of the base64url (no padding) form of a 32-byte token.
const TOKEN_TEXT_LEN: usize = 43;

/// A session id: 256 random bits. The cookie value is its base64url form.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SessionId {
    raw: [u8; TOKEN_BYTES],
    text: String,
}

impl SessionId {
    /// A fresh id from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut raw = [0u8; TOKEN_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let text = URL_SAFE_NO_PAD.encode(raw);
        SessionId { raw, text }
    }

    /// Parses a cookie value. Only the exact canonical form `generate` produces is accepted
    /// (43 base64url characters, no padding), so one id has one spelling.
    pub fn parse(cookie_value: &str) -> Option<Self> {
        if cookie_value.len() != TOKEN_TEXT_LEN {
            return None;
        }
        let mut raw = [0u8; TOKEN_BYTES];
        // The engine rejects non-zero trailing bits, so a decoded id re-encodes to the input.
        let n = URL_SAFE_NO_PAD
            .decode_slice(cookie_value.as_bytes(), &mut raw)
            .ok()?;
        if n != TOKEN_BYTES {
            raw.zeroize();
            return None;
        }
        Some(SessionId {
            raw,
            text: cookie_value.to_owned(),
        })
    }

    /// The cookie value (base64url, no padding).
    pub fn as_cookie_value(&self) -> &str {
        &self.text
    }

    /// SHA-256 of the id: the only form a store keeps.
    pub fn store_key(&self) -> [u8; 32] {
        Sha256::digest(self.raw).into()
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionId([redacted])")
    }
}

/// A live session as the request path sees it (a copy; changing it changes nothing stored).
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    /// The user name.
    pub user: CompactString,
    /// The user's roles at login.
    pub roles: Vec<CompactString>,
    /// The CSRF token (base64url, 256 bits) the SPA must echo in `X-CSRF-Token`.
    pub csrf_token: String,
    /// Login time (unix seconds).
    pub created_at: u64,
    /// Last time the session was used with `touch` (unix seconds).
    pub last_seen: u64,
    /// When the session ends if not used again (unix seconds).
    pub idle_expires_at: u64,
    /// When the session ends regardless of use (unix seconds).
    pub absolute_expires_at: u64,
}

impl Session {
    /// When the session ends: the earlier of the idle and the absolute expiry.
    pub fn expires_at(&self) -> u64 {
        self.idle_expires_at.min(self.absolute_expires_at)
    }

    /// Whether `presented` equals this session's CSRF token, compared in constant time.
    pub fn csrf_matches(&self, presented: &str) -> bool {
        // Lengths are not secret (every token has 43 characters); contents are compared with
        // `subtle` so timing does not reveal a matching prefix.
        bool::from(self.csrf_token.as_bytes().ct_eq(presented.as_bytes()))
    }

    /// The identity to sign requests with.
    pub fn identity(&self) -> Identity {
        Identity {
            user: self.user.clone(),
            roles: self.roles.clone(),
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("user", &self.user)
            .field("roles", &self.roles)
            .field("csrf_token", &"[redacted]")
            .field("created_at", &self.created_at)
            .field("last_seen", &self.last_seen)
            .field("idle_expires_at", &self.idle_expires_at)
            .field("absolute_expires_at", &self.absolute_expires_at)
            .finish()
    }
}

/// A live session as the proxied request path needs it: the identity to sign with, kept
/// encoded as the store holds it (signing sets it as it is), and the CSRF token, compared but
/// never turned into text unless the store holds it as text. What
/// [`SessionStore::get_for_request`] returns; [`Session`] is the full record, for the `/auth/*`
/// endpoints.
pub struct RequestSession {
    /// The identity, encoded as in the identity fields.
    pub identity: EncodedIdentity,
    csrf: CsrfSecret,
}

/// The session's CSRF token as the store gave it.
enum CsrfSecret {
    /// The raw 256 bits (the memory store).
    Raw([u8; TOKEN_BYTES]),
    /// Its base64url text (stores that keep it as text).
    Text(String),
}

impl RequestSession {
    /// Whether `presented` (the `X-CSRF-Token` value) is the session's CSRF token: the same
    /// comparison as [`Session::csrf_matches`], in constant time, with the raw token encoded
    /// on the stack.
    pub fn csrf_matches(&self, presented: &[u8]) -> bool {
        match &self.csrf {
            CsrfSecret::Raw(raw) => {
                let mut text = [0u8; TOKEN_TEXT_LEN];
                let matches = match URL_SAFE_NO_PAD.encode_slice(raw, &mut text) {
                    Ok(TOKEN_TEXT_LEN) => bool::from(text.as_slice().ct_eq(presented)),
                    _ => false,
                };
                text.zeroize();
                matches
            }
            CsrfSecret::Text(text) => {
                !text.is_empty() && bool::from(text.as_bytes().ct_eq(presented))
            }
        }
    }

    /// The identity, once the CSRF token is no longer needed.
    pub fn into_identity(self) -> EncodedIdentity {
        self.identity
    }
}

impl From<Session> for RequestSession {
    fn from(mut session: Session) -> RequestSession {
        let identity = EncodedIdentity::new(&Identity {
            user: std::mem::take(&mut session.user),
            roles: std::mem::take(&mut session.roles),
        });
        RequestSession {
            identity,
            csrf: CsrfSecret::Text(std::mem::take(&mut session.csrf_token)),
        }
    }
}

impl Drop for CsrfSecret {
    fn drop(&mut self) {
        match self {
            CsrfSecret::Raw(raw) => raw.zeroize(),
            CsrfSecret::Text(text) => text.zeroize(),
        }
    }
}

impl fmt::Debug for RequestSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestSession")
            .field("identity", &self.identity)
            .field("csrf", &"[redacted]")
            .finish()
    }
}

/// The answer of [`SessionStore::get_for_request`]: at once (a store that answers without
/// waiting, such as the memory store: no boxed future per request), or later.
pub enum Lookup<'a> {
    /// Answered.
    Ready(Option<Result<Option<RequestSession>, StoreError>>),
    /// To be awaited.
    Pending(BoxFuture<'a, Result<Option<RequestSession>, StoreError>>),
}

impl Future for Lookup<'_> {
    type Output = Result<Option<RequestSession>, StoreError>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.get_mut() {
            Lookup::Ready(answer) => {
                std::task::Poll::Ready(answer.take().unwrap_or_else(|| {
                    Err(StoreError::new("session lookup polled after it ended"))
                }))
            }
            Lookup::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

/// The session store failed (full, unreachable). The request path answers 503
/// `{"error":"session_store_unavailable"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(String);

impl StoreError {
    /// An error with a message for the log.
    pub fn new(message: impl Into<String>) -> Self {
        StoreError(message.into())
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// Where sessions live. Implementations: [`MemorySessionStore`] and
/// `session_redis::RedisSessionStore`.
pub trait SessionStore: Send + Sync + 'static {
    /// Creates a session for `identity` at `now`; new random id and csrf token (256 bits each).
    fn create<'a>(
        &'a self,
        identity: &'a Identity,
        now: u64,
    ) -> BoxFuture<'a, Result<(SessionId, Session), StoreError>>;
    /// The live session for `id`, or None if absent/expired. `touch` = extend idle expiry.
    fn get<'a>(
        &'a self,
        id: &'a SessionId,
        now: u64,
        touch: bool,
    ) -> BoxFuture<'a, Result<Option<Session>, StoreError>>;
    /// [`SessionStore::get`] for the proxied request path: the same session (the same
    /// expiry and `touch`), as a [`RequestSession`]. The default converts what `get` returns;
    /// a store that keeps identities encoded answers without decoding them.
    fn get_for_request<'a>(&'a self, id: &'a SessionId, now: u64, touch: bool) -> Lookup<'a> {
        Lookup::Pending(Box::pin(async move {
            Ok(self.get(id, now, touch).await?.map(RequestSession::from))
        }))
    }
    /// [`SessionStore::create`] for a login checked against a users file: `stamp` is the
    /// user's [`CredentialStamp`] in that file, for [`SessionStore::get_checked`] to compare.
    /// The default ignores it (the memory store: its sessions end with the process, and a
    /// users-file reload ends those of the users it changes, `ProxyState::end_sessions_of`).
    fn create_stamped<'a>(
        &'a self,
        identity: &'a Identity,
        stamp: Option<CredentialStamp>,
        now: u64,
    ) -> BoxFuture<'a, Result<(SessionId, Session), StoreError>> {
        let _ = stamp;
        self.create(identity, now)
    }
    /// [`SessionStore::get`] on a proxy with a users file (`users`): a store whose sessions
    /// can outlive the users file they were created under (Redis: every proxy restarted on a
    /// new file, proxies of a fleet on different files) answers None, as for an unknown
    /// session, unless `users` still has the session's user with the stamp kept at login,
    /// and then leaves the session as it is (not touched, not deleted). The default is
    /// `get` (the memory store: see [`SessionStore::create_stamped`]).
    fn get_checked<'a>(
        &'a self,
        id: &'a SessionId,
        now: u64,
        touch: bool,
        users: Option<&'a UsersHandle>,
    ) -> BoxFuture<'a, Result<Option<Session>, StoreError>> {
        let _ = users;
        self.get(id, now, touch)
    }
    /// [`SessionStore::get_for_request`] with the check of [`SessionStore::get_checked`].
    /// The default is `get_for_request` (the memory store's answer at once, no extra work).
    fn get_for_request_checked<'a>(
        &'a self,
        id: &'a SessionId,
        now: u64,
        touch: bool,
        users: Option<&'a UsersHandle>,
    ) -> Lookup<'a> {
        let _ = users;
        self.get_for_request(id, now, touch)
    }
    /// Ends the session `id` (absent is not an error).
    fn delete<'a>(&'a self, id: &'a SessionId) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Ends every session of `user`; returns how many.
    fn delete_user<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<usize, StoreError>>;
    /// Number of sessions held (live, plus expired ones not yet swept).
    fn count(&self) -> BoxFuture<'_, Result<usize, StoreError>>;
    /// Whether the store can serve requests (for `/readyz`).
    fn ready(&self) -> BoxFuture<'_, bool>;
    /// Sets the lifetimes of the sessions this store answers from now on (a reload that
    /// applies `session.idle_timeout` and `session.absolute_timeout`), both at once. Returns
    /// whether the store took them; the default (a store without live lifetimes) does not.
    fn set_timeouts(&self, timeouts: SessionTimeouts) -> bool {
        let _ = timeouts;
        false
    }
    /// Sets `session.max_sessions_per_user` for the logins from now on (a reload): a login
    /// of a user holding that many live sessions ends the user's oldest ones first. Sessions
    /// already held above a lowered cap are kept until that user's next login. Returns
    /// whether the store took it; the default (a store without the cap) does not.
    fn set_max_sessions_per_user(&self, max: usize) -> bool {
        let _ = max;
        false
    }
    /// The in-process store behind this one, if it is one (the session snapshot of
    /// `session.snapshot_file` works on it only). The default: None.
    fn as_memory(&self) -> Option<&MemorySessionStore> {
        None
    }
}

/// Session lifetimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimeouts {
    /// A session unused for this long ends.
    pub idle: Duration,
    /// A session ends this long after login, used or not.
    pub absolute: Duration,
}

/// [`SessionTimeouts`] a reload can change while lookups read them: both lifetimes, in whole
/// seconds, in one atomic word (idle in the high half, absolute in the low half), so a lookup
/// reads them with one load and never sees one lifetime of a reload without the other. Each
/// is at most 365 days (the config's bound), far below `u32::MAX` seconds; a larger one is
/// kept as `u32::MAX` seconds (136 years). Shared by clones.
#[derive(Debug, Clone)]
pub struct LiveSessionTimeouts(Arc<AtomicU64>);

impl LiveSessionTimeouts {
    /// These lifetimes.
    pub fn new(timeouts: SessionTimeouts) -> Self {
        LiveSessionTimeouts(Arc::new(AtomicU64::new(Self::pack(timeouts))))
    }

    fn pack(timeouts: SessionTimeouts) -> u64 {
        let secs = |d: Duration| u64::from(u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
        (secs(timeouts.idle) << 32) | secs(timeouts.absolute)
    }

    /// The idle and the absolute lifetime, in seconds.
    #[inline]
    pub fn secs(&self) -> (u64, u64) {
        let word = self.0.load(Ordering::Relaxed);
        (word >> 32, word & u64::from(u32::MAX))
    }

    /// The lifetimes now.
    pub fn get(&self) -> SessionTimeouts {
        let (idle, absolute) = self.secs();
        SessionTimeouts {
            idle: Duration::from_secs(idle),
            absolute: Duration::from_secs(absolute),
        }
    }

    /// Replaces both lifetimes at once.
    pub fn set(&self, timeouts: SessionTimeouts) {
        self.0.store(Self::pack(timeouts), Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// Memory store
// ---------------------------------------------------------------------------------------------

/// Marks the end of a slot list.
const NIL: u32 = u32::MAX;

/// Slots swept per lock acquisition: small enough that a sweep never stalls requests for long.
const SWEEP_CHUNK: usize = 4096;

/// Independent locks: a create or delete blocks only the lookups of one shard.
const SHARDS: usize = 16;

/// The encoded identity `<name>:<roles>` (each part percent-encoded as in the identity
/// headers, so `:` and `,` cannot occur inside a part). Hashes and compares by the name part
/// only, so the per-user index can be looked up with a plain `&str` name.
#[derive(Clone)]
struct IdentityKey(Arc<str>);

impl IdentityKey {
    fn encode(identity: &Identity) -> String {
        let mut s = encode_value(&identity.user);
        s.push(':');
        s.push_str(&encode_roles(&identity.roles));
        s
    }

    fn name_part(&self) -> &str {
        name_part(&self.0)
    }
}

fn name_part(encoded: &str) -> &str {
    encoded.split_once(':').map_or(encoded, |(name, _)| name)
}

impl PartialEq for IdentityKey {
    fn eq(&self, other: &Self) -> bool {
        self.name_part() == other.name_part()
    }
}
impl Eq for IdentityKey {}
impl Hash for IdentityKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name_part().hash(state);
    }
}
impl Borrow<str> for IdentityKey {
    fn borrow(&self) -> &str {
        self.name_part()
    }
}

/// A stored identity's text as the storage of [`Bytes`], so the request path can share it
/// with the upstream request's identity fields instead of copying it.
struct SharedText(Arc<str>);

impl AsRef<[u8]> for SharedText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// One session in the slab.
struct Slot {
    /// SHA-256 of the session id (the index holds its first 16 bytes).
    key: [u8; 32],
    csrf: [u8; TOKEN_BYTES],
    created_at: u64,
    /// Updated under the read lock by `get(touch = true)`, hence atomic.
    last_seen: AtomicU64,
    /// The encoded identity; `None` marks a free slot.
    identity: Option<Arc<str>>,
    /// Doubly linked list of the slots of one user (or, for free slots, the free list).
    prev: u32,
    next: u32,
    /// Bumped when the slot is freed, so expiry entries of an earlier session in this slot
    /// are recognised as stale.
    generation: u32,
    /// Login order (the store's counter, wrapping), telling apart the logins of one second
    /// when `max_sessions_per_user` ends a user's oldest session. Fits the slot's padding.
    seq: u32,
}

/// Hashes an index key by taking 8 of its bytes: the keys are SHA-256 outputs, uniformly
/// distributed, and nobody can choose them (a presented id is hashed first), so SipHash would
/// only cost time on the hot path.
#[derive(Default, Clone, Copy)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 16]` hashes as its length followed by its bytes; keep the first 8 key bytes.
        for &b in bytes.iter().take(8) {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_usize(&mut self, _length: usize) {}
}

type IndexHasher = std::hash::BuildHasherDefault<PrefixHasher>;

struct Inner {
    /// First 16 bytes of SHA-256(id) -> slot number. 16 bytes (alignment 1) keep an index
    /// entry at 20 bytes; the slot's full hash is compared on lookup.
    index: HashMap<[u8; 16], u32, IndexHasher>,
    slots: Vec<Slot>,
    free_head: u32,
    /// User name (encoded) -> first slot of that user's list in this shard.
    users: HashMap<IdentityKey, u32>,
    /// Expiry queue: second -> (slot, generation) of sessions that may expire then. An entry
    /// is the session's expiry when it was queued; a session touched since is re-queued at
    /// its new expiry when the entry comes due, so sweeping costs O(due entries), not a scan
    /// of every session.
    expiry: BTreeMap<u64, Vec<(u32, u32)>>,
}

/// In-process session store: sessions keyed by SHA-256 of the id, a per-user index for
/// `delete_user`, bounded by `max_sessions`, expired sessions removed by
/// [`MemorySessionStore::spawn_sweeper`].
pub struct MemorySessionStore {
    /// The lifetimes, read at each lookup: a reload that changes them applies to the sessions
    /// already issued too (their expiry is worked out from their login and last use).
    timeouts: LiveSessionTimeouts,
    max_sessions: usize,
    /// Sessions held, all shards (reserved before insertion, so never above the limit).
    live: AtomicUsize,
    /// The second of `create`'s last sweep because the store was full, lowered so that no
    /// session held expires at or before it: to the login time of a session created at an
    /// earlier second (the clock stepped back), to 0 by a reload that shortens a lifetime.
    /// So a full store finding it equal to `now` has nothing to reclaim.
    last_reclaim: AtomicU64,
    /// Shard `i` holds the sessions whose hash ends in a byte `b` with `b % SHARDS == i`.
    shards: Box<[RwLock<Inner>]>,
    /// Most live sessions of one user (`session.max_sessions_per_user`; `usize::MAX`: no
    /// cap). Read at each login, so a reload applies to the next one.
    max_per_user: AtomicUsize,
    /// The next login's [`Slot::seq`].
    login_seq: AtomicU32,
    /// Logins of one user hold the lock of their name's stripe while they count, end the
    /// oldest and insert, so two concurrent logins of a user never both see room under the
    /// cap. Never taken while a shard lock is held.
    user_locks: Box<[Mutex<()>]>,
    /// Picks a name's stripe (keyed per process: nobody can aim many names at one stripe).
    user_lock_hasher: RandomState,
}

/// Stripes of [`MemorySessionStore::user_locks`].
const USER_LOCKS: usize = 64;

/// The order of two logins' [`Slot::seq`] of about the same time (the counter wraps; two
/// logins of one second are far less than 2^31 apart).
fn seq_order(a: u32, b: u32) -> CmpOrdering {
    // The wrapping difference read as signed: negative when `a` came first.
    i32::from_ne_bytes(a.wrapping_sub(b).to_ne_bytes()).cmp(&0)
}

impl fmt::Debug for MemorySessionStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySessionStore")
            .field("timeouts", &self.timeouts)
            .field("max_sessions", &self.max_sessions)
            .field("max_per_user", &self.max_per_user)
            .finish_non_exhaustive()
    }
}

/// The shard of a session: from the hash's last byte, which the index key (first 16 bytes)
/// does not include, so the index hash keeps all its entropy within a shard.
fn shard_of(key: &[u8; 32]) -> usize {
    usize::from(key[31]) % SHARDS
}

fn index_key(key: &[u8; 32]) -> [u8; 16] {
    let mut head = [0u8; 16];
    head.copy_from_slice(&key[..16]);
    head
}

impl MemorySessionStore {
    /// A store with these timeouts holding at most `max_sessions` sessions (live or expired
    /// but not yet swept). At the limit `create` fails; live sessions are never evicted to
    /// make room for another user. No per-user cap: see
    /// [`MemorySessionStore::with_max_sessions_per_user`].
    pub fn new(timeouts: SessionTimeouts, max_sessions: usize) -> Self {
        MemorySessionStore {
            timeouts: LiveSessionTimeouts::new(timeouts),
            // More than u32::MAX - 1 slots cannot be numbered.
            max_sessions: max_sessions.min((NIL - 1) as usize),
            live: AtomicUsize::new(0),
            last_reclaim: AtomicU64::new(0),
            shards: (0..SHARDS)
                .map(|_| {
                    RwLock::new(Inner {
                        index: HashMap::default(),
                        slots: Vec::new(),
                        free_head: NIL,
                        users: HashMap::new(),
                        expiry: BTreeMap::new(),
                    })
                })
                .collect(),
            max_per_user: AtomicUsize::new(usize::MAX),
            login_seq: AtomicU32::new(0),
            user_locks: (0..USER_LOCKS).map(|_| Mutex::new(())).collect(),
            user_lock_hasher: RandomState::new(),
        }
    }

    /// This store with `session.max_sessions_per_user`: a login of a user who already holds
    /// `max` live sessions first ends that user's oldest (by login time, then login order).
    /// Zero is taken as one.
    pub fn with_max_sessions_per_user(self, max: usize) -> Self {
        self.max_per_user.store(max.max(1), Ordering::Relaxed);
        self
    }

    /// The per-user cap now (`usize::MAX`: none).
    pub fn max_sessions_per_user(&self) -> usize {
        self.max_per_user.load(Ordering::Relaxed)
    }

    /// Ends the oldest live sessions of `name` (encoded, as in the per-user lists) until it
    /// holds fewer than `cap` at `now`, so that one more fits. The caller holds the name's
    /// stripe of `user_locks`. Returns how many it ended; their places in `max_sessions` are
    /// still taken: the caller gives all but one back and keeps that one for the new session.
    fn make_room_for_user(&self, name: &str, cap: usize, now: u64) -> usize {
        // (login time, login order, shard, slot, generation) of each live session.
        let mut live: Vec<(u64, u32, usize, u32, u32)> = Vec::new();
        for (i, shard) in self.shards.iter().enumerate() {
            let inner = shard.read();
            let Some(&first) = inner.users.get(name) else {
                continue;
            };
            let mut cursor = first;
            while cursor != NIL {
                let slot = &inner.slots[cursor as usize];
                let last_seen = slot.last_seen.load(Ordering::Relaxed);
                if now < self.expires_at(slot.created_at, last_seen) {
                    live.push((slot.created_at, slot.seq, i, cursor, slot.generation));
                }
                cursor = slot.next;
            }
        }
        if live.len() < cap {
            return 0;
        }
        let excess = live.len() + 1 - cap;
        live.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| seq_order(a.1, b.1)));
        let mut ended = 0;
        for &(_, _, shard, number, generation) in &live[..excess] {
            let mut inner = self.shards[shard].write();
            // Still that session (a logout may have freed the slot, another login taken it).
            let same = inner
                .slots
                .get(number as usize)
                .is_some_and(|slot| slot.generation == generation && slot.identity.is_some());
            if same && Self::remove_slot(&mut inner, number) {
                ended += 1;
            }
        }
        ended
    }

    fn shard(&self, key: &[u8; 32]) -> &RwLock<Inner> {
        &self.shards[shard_of(key)]
    }

    /// Takes one place under `max_sessions`, or fails.
    fn reserve(&self) -> bool {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_sessions).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self, places: usize) {
        if places > 0 {
            self.live.fetch_sub(places, Ordering::AcqRel);
        }
    }

    /// The timeouts now (as configured, or as a reload set them).
    pub fn timeouts(&self) -> SessionTimeouts {
        self.timeouts.get()
    }

    fn expires_at(&self, created_at: u64, last_seen: u64) -> u64 {
        let (idle, absolute) = self.timeouts.secs();
        last_seen
            .saturating_add(idle)
            .min(created_at.saturating_add(absolute))
    }

    fn session_from_slot(&self, slot: &Slot, identity: &str, last_seen: u64) -> Option<Session> {
        let (name, roles) = identity.split_once(':')?;
        let (idle, absolute) = self.timeouts.secs();
        Some(Session {
            user: decode_value(name)?,
            roles: decode_roles(roles)?,
            csrf_token: URL_SAFE_NO_PAD.encode(slot.csrf),
            created_at: slot.created_at,
            last_seen,
            idle_expires_at: last_seen.saturating_add(idle),
            absolute_expires_at: slot.created_at.saturating_add(absolute),
        })
    }

    fn create_sync(
        &self,
        identity: &Identity,
        now: u64,
    ) -> Result<(SessionId, Session), StoreError> {
        let encoded = IdentityKey::encode(identity);
        let cap = self.max_per_user.load(Ordering::Relaxed);
        // Held until the session is in place: the user's logins one at a time.
        let (_user_guard, ended) = if cap == usize::MAX {
            (None, 0)
        } else {
            let name = name_part(&encoded);
            let stripe = self.user_lock_hasher.hash_one(name) as usize % USER_LOCKS;
            let guard = self.user_locks[stripe].lock();
            let ended = self.make_room_for_user(name, cap, now);
            if ended > 0 {
                tracing::info!(
                    user = identity.user.as_str(),
                    ended,
                    max_sessions_per_user = cap,
                    "login ended the user's oldest session(s) (session.max_sessions_per_user)"
                );
            }
            (Some(guard), ended)
        };
        let mut csrf = [0u8; TOKEN_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut csrf);
        // A login that ended the user's oldest session takes over that session's place in
        // `max_sessions`: reserving anew, after giving it back, could find the store filled by
        // another login in between and answer 503 with the old session already ended (a refused
        // login must change nothing).
        if ended > 0 {
            self.release(ended - 1);
        } else if !self.reserve() {
            // Expired sessions may still occupy room until the sweeper runs: reclaim them
            // before refusing. Only when the store is full, and at most once per second, so a
            // store full of live sessions does not rescan on every login attempt: skipped only
            // when `last_reclaim` is this very second (see its invariant). Not "a second after
            // the latest reclaim": after the clock stepped back, a reclaim second kept in the
            // future stopped every reclaim at login for as long as the step
            // (tests/session_review.rs).
            if self.last_reclaim.swap(now, Ordering::AcqRel) != now {
                self.sweep(now);
            }
            if !self.reserve() {
                return Err(StoreError::new(format!(
                    "session store is full (max_sessions = {})",
                    self.max_sessions
                )));
            }
        }
        // A fresh id whose 128-bit index prefix is unused (a clash is astronomically unlikely;
        // drawing again keeps the index exact rather than hoping).
        let (id, key, mut inner) = loop {
            let id = SessionId::generate();
            let key = id.store_key();
            let inner = self.shard(&key).write();
            if !inner.index.contains_key(&index_key(&key)) {
                break (id, key, inner);
            }
        };
        if let Err(e) = self.insert_locked(&mut inner, key, csrf, now, now, &encoded) {
            csrf.zeroize();
            return Err(e);
        }
        drop(inner);
        // A login at a second before the last reclaim's (the clock stepped back): this session
        // may expire at or before that second, so a reclaim then must not be skipped.
        self.last_reclaim.fetch_min(now, Ordering::AcqRel);
        let (idle, absolute) = self.timeouts.secs();
        let session = Session {
            user: identity.user.clone(),
            roles: identity.roles.clone(),
            csrf_token: URL_SAFE_NO_PAD.encode(csrf),
            created_at: now,
            last_seen: now,
            idle_expires_at: now.saturating_add(idle),
            absolute_expires_at: now.saturating_add(absolute),
        };
        csrf.zeroize();
        Ok((id, session))
    }

    /// Puts a session into the shard `inner` (locked for writing; the session's place in
    /// `live` already reserved, and given back here if no slot can be numbered): its slot, its
    /// user's list (sharing the identity text with the user's other sessions when name and
    /// roles match), the index and the expiry queue. `create` and a snapshot's restore.
    fn insert_locked(
        &self,
        inner: &mut Inner,
        key: [u8; 32],
        csrf: [u8; TOKEN_BYTES],
        created_at: u64,
        last_seen: u64,
        encoded: &str,
    ) -> Result<(), StoreError> {
        let (identity_arc, old_head) = match inner.users.get_key_value(name_part(encoded)) {
            Some((_, &first)) => {
                let existing = inner.slots[first as usize].identity.clone();
                match existing {
                    Some(arc) if *arc == *encoded => (arc, first),
                    _ => (Arc::<str>::from(encoded), first),
                }
            }
            None => (Arc::<str>::from(encoded), NIL),
        };
        let mut slot = Slot {
            key,
            csrf,
            created_at,
            last_seen: AtomicU64::new(last_seen),
            identity: Some(identity_arc.clone()),
            prev: NIL,
            next: old_head,
            generation: 0,
            seq: self.login_seq.fetch_add(1, Ordering::Relaxed),
        };
        let number = if inner.free_head != NIL {
            let number = inner.free_head;
            let freed = &inner.slots[number as usize];
            inner.free_head = freed.next;
            slot.generation = freed.generation;
            inner.slots[number as usize] = slot;
            number
        } else {
            // Cannot overflow: max_sessions < u32::MAX bounds every shard's slot count.
            let number = u32::try_from(inner.slots.len()).unwrap_or(NIL);
            if number == NIL {
                self.release(1);
                return Err(StoreError::new("session slots exhausted"));
            }
            inner.slots.push(slot);
            number
        };
        if old_head != NIL {
            inner.slots[old_head as usize].prev = number;
        }
        inner.users.insert(IdentityKey(identity_arc), number);
        inner.index.insert(index_key(&key), number);
        let generation = inner.slots[number as usize].generation;
        inner
            .expiry
            .entry(self.expires_at(created_at, last_seen))
            .or_default()
            .push((number, generation));
        Ok(())
    }

    fn find(inner: &Inner, key: &[u8; 32]) -> Option<u32> {
        let number = *inner.index.get(&index_key(key))?;
        let slot = inner.slots.get(number as usize)?;
        (slot.identity.is_some() && slot.key == *key).then_some(number)
    }

    fn get_sync(&self, id: &SessionId, now: u64, touch: bool) -> Option<Session> {
        self.with_live_slot(id, now, touch, |slot, identity, last_seen| {
            self.session_from_slot(slot, identity, last_seen)
        })
    }

    /// [`Self::get_sync`] without decoding the identity or encoding the CSRF token: the
    /// identity's stored text is shared (one reference count), its parts checked.
    fn get_for_request_sync(
        &self,
        id: &SessionId,
        now: u64,
        touch: bool,
    ) -> Option<RequestSession> {
        self.with_live_slot(id, now, touch, |slot, identity, _| {
            let (name, _) = identity.split_once(':')?;
            let shared = Bytes::from_owner(SharedText(slot.identity.clone()?));
            Some(RequestSession {
                identity: EncodedIdentity::from_encoded(
                    shared.slice(..name.len()),
                    shared.slice(name.len() + 1..),
                )?,
                csrf: CsrfSecret::Raw(slot.csrf),
            })
        })
    }

    /// Runs `read` on the live session `id` (its slot, encoded identity and last use, after
    /// the touch when `touch`), under the shard's read lock. None when absent or expired.
    fn with_live_slot<T>(
        &self,
        id: &SessionId,
        now: u64,
        touch: bool,
        read: impl FnOnce(&Slot, &str, u64) -> Option<T>,
    ) -> Option<T> {
        let key = id.store_key();
        let inner = self.shard(&key).read();
        let number = Self::find(&inner, &key)?;
        let slot = inner.slots.get(number as usize)?;
        let identity = slot.identity.as_deref()?;
        let last_seen = slot.last_seen.load(Ordering::Relaxed);
        if now >= self.expires_at(slot.created_at, last_seen) {
            // Expired: invisible from now on; the sweeper frees the slot.
            return None;
        }
        let last_seen = if touch {
            // fetch_max: concurrent touches never move last_seen backwards.
            slot.last_seen.fetch_max(now, Ordering::Relaxed).max(now)
        } else {
            last_seen
        };
        read(slot, identity, last_seen)
    }

    /// Removes slot `number` from the index and its user list. Returns whether there was a
    /// session to remove (the caller releases its place in `live`).
    fn remove_slot(inner: &mut Inner, number: u32) -> bool {
        let Some(slot) = inner.slots.get_mut(number as usize) else {
            return false;
        };
        let Some(identity) = slot.identity.take() else {
            return false;
        };
        slot.csrf.zeroize();
        slot.generation = slot.generation.wrapping_add(1);
        let hash_prefix = index_key(&slot.key);
        slot.key.zeroize();
        let (prev, next) = (slot.prev, slot.next);
        slot.prev = NIL;
        slot.next = inner.free_head;
        inner.free_head = number;
        if next != NIL {
            inner.slots[next as usize].prev = prev;
        }
        if prev != NIL {
            inner.slots[prev as usize].next = next;
        } else if next != NIL {
            // It was the head of its user's list: the next slot becomes the head.
            if let Some(head) = inner.users.get_mut(name_part(&identity)) {
                *head = next;
            }
        } else {
            inner.users.remove(name_part(&identity));
        }
        inner.index.remove(&hash_prefix);
        true
    }

    fn delete_sync(&self, id: &SessionId) {
        self.delete_key(&id.store_key());
    }

    /// Ends the session stored under `key` (the SHA-256 of its id), if there is one: a
    /// snapshot's restore takes back what it imported from a file whose seal then fails.
    pub(crate) fn delete_key(&self, key: &[u8; 32]) {
        let mut inner = self.shard(key).write();
        if let Some(number) = Self::find(&inner, key) {
            if Self::remove_slot(&mut inner, number) {
                self.release(1);
            }
        }
    }

    fn delete_user_sync(&self, user: &str) -> usize {
        let encoded_name = encode_value(user);
        let mut total = 0;
        // Each shard has its own index of the user's sessions: one lookup per shard.
        for shard in self.shards.iter() {
            let mut inner = shard.write();
            let Some(&first) = inner.users.get(encoded_name.as_str()) else {
                continue;
            };
            let mut numbers = Vec::new();
            let mut cursor = first;
            while cursor != NIL {
                numbers.push(cursor);
                cursor = inner.slots[cursor as usize].next;
            }
            let removed = numbers
                .into_iter()
                .filter(|&number| Self::remove_slot(&mut inner, number))
                .count();
            drop(inner);
            self.release(removed);
            total += removed;
        }
        total
    }

    /// Processes due expiry entries of one shard: removes the sessions that have expired and
    /// re-queues the ones touched since they were queued. Returns the number removed.
    fn sweep_entries(&self, inner: &mut Inner, entries: &[(u32, u32)], now: u64) -> usize {
        let mut removed = 0;
        for &(number, generation) in entries {
            let Some(slot) = inner.slots.get(number as usize) else {
                continue;
            };
            if slot.generation != generation || slot.identity.is_none() {
                // The session ended already (logout, revoke); the slot may hold another one.
                continue;
            }
            let expires_at =
                self.expires_at(slot.created_at, slot.last_seen.load(Ordering::Relaxed));
            if now >= expires_at {
                if Self::remove_slot(inner, number) {
                    removed += 1;
                }
            } else {
                inner
                    .expiry
                    .entry(expires_at)
                    .or_default()
                    .push((number, generation));
            }
        }
        removed
    }

    /// Queues every session again at its expiry under the lifetimes now (after a reload
    /// shortened one: the queue's entries are the expiries under the old ones, later than the
    /// new). A reload's work, never the request path's: each shard's queue is taken whole,
    /// then put back [`SWEEP_CHUNK`] entries per hold of the lock, so a lookup waits at most
    /// for one chunk (1M sessions take ~0.2 s in all).
    fn requeue_all(&self) {
        for shard in self.shards.iter() {
            let queued: Vec<(u32, u32)> = {
                let mut inner = shard.write();
                std::mem::take(&mut inner.expiry)
                    .into_values()
                    .flatten()
                    .collect()
            };
            for chunk in queued.chunks(SWEEP_CHUNK) {
                // At time 0 no session has expired: each live one is queued again at its
                // expiry (the sweep proper removes the ended ones when they come due).
                self.sweep_entries(&mut shard.write(), chunk, 0);
            }
        }
    }

    /// Removes every expired session. Work is proportional to the expiry entries that are
    /// due, and one shard's lock is held for at most a few thousand entries at a time.
    /// Returns how many were removed.
    pub fn sweep(&self, now: u64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            loop {
                let due = {
                    let mut inner = shard.write();
                    match inner.expiry.first_key_value() {
                        Some((&second, _)) if second <= now => {
                            inner.expiry.remove(&second).unwrap_or_default()
                        }
                        _ => break,
                    }
                };
                for chunk in due.chunks(SWEEP_CHUNK) {
                    let n = self.sweep_entries(&mut shard.write(), chunk, now);
                    self.release(n);
                    removed += n;
                }
            }
        }
        removed
    }

    /// Runs [`sweep`](Self::sweep) every `interval` on the tokio runtime, with time from
    /// `clock`. Stops when the store is dropped.
    pub fn spawn_sweeper(
        self: &Arc<Self>,
        interval: Duration,
        clock: SharedClock,
    ) -> tokio::task::JoinHandle<()> {
        spawn_periodic(self, interval, move |store| {
            let removed = store.sweep(clock.now_unix());
            async move {
                if removed > 0 {
                    tracing::debug!(removed, "expired sessions swept");
                }
            }
        })
    }
}

/// One session as [`MemorySessionStore::export_live`] copies it out and
/// [`MemorySessionStore::import`] puts it back: what a session snapshot holds (no session id,
/// only its SHA-256). Its secrets are zeroized on drop.
pub(crate) struct StoredSession {
    /// SHA-256 of the session id.
    pub key: [u8; 32],
    /// The raw CSRF token.
    pub csrf: [u8; TOKEN_BYTES],
    /// Login time (unix seconds).
    pub created_at: u64,
    /// Last use (unix seconds).
    pub last_seen: u64,
    /// The identity, encoded as the store keeps it (`<name>:<roles>`, each part
    /// percent-encoded as in the identity fields).
    pub identity: Arc<str>,
}

impl StoredSession {
    /// The user name, decoded (None if the encoded identity is not well-formed).
    pub fn user(&self) -> Option<CompactString> {
        let (name, roles) = self.identity.split_once(':')?;
        decode_roles(roles)?;
        decode_value(name)
    }
}

impl Drop for StoredSession {
    fn drop(&mut self) {
        self.key.zeroize();
        self.csrf.zeroize();
    }
}

/// What [`MemorySessionStore::import`] did with one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Imported {
    /// Held from now on.
    Added,
    /// Ended by its lifetimes at `now`: not held.
    Expired,
    /// The store already holds a session with that key: not held again.
    Duplicate,
    /// The encoded identity is not well-formed: not held.
    Malformed,
    /// `max_sessions` reached: not held.
    Full,
}

impl MemorySessionStore {
    /// Copies of the sessions live at `now`, shard by shard (each under its read lock, so
    /// requests go on meanwhile). For a snapshot when the proxy stops.
    pub(crate) fn export_live(&self, now: u64) -> Vec<StoredSession> {
        let mut out = Vec::with_capacity(self.live.load(Ordering::Acquire));
        for shard in self.shards.iter() {
            let inner = shard.read();
            for slot in &inner.slots {
                let Some(identity) = slot.identity.clone() else {
                    continue;
                };
                let last_seen = slot.last_seen.load(Ordering::Relaxed);
                if now >= self.expires_at(slot.created_at, last_seen) {
                    continue;
                }
                out.push(StoredSession {
                    key: slot.key,
                    csrf: slot.csrf,
                    created_at: slot.created_at,
                    last_seen,
                    identity,
                });
            }
        }
        out
    }

    /// Holds `session` again (a snapshot's restore at start), with its login time and last
    /// use as they were, under this store's lifetimes and `max_sessions`.
    pub(crate) fn import(&self, session: &StoredSession, now: u64) -> Imported {
        if session.user().is_none() {
            return Imported::Malformed;
        }
        // A last use or login after `now` (a clock set back since the snapshot) counts as
        // `now`: the idle timeout runs from no later than the restore, and so does the
        // absolute one (a login time in the future would keep the session past it by as far
        // as the clock was ahead).
        let last_seen = session.last_seen.min(now);
        let created_at = session.created_at.min(now);
        if now >= self.expires_at(created_at, last_seen) {
            return Imported::Expired;
        }
        if !self.reserve() {
            return Imported::Full;
        }
        let mut inner = self.shard(&session.key).write();
        if inner.index.contains_key(&index_key(&session.key)) {
            drop(inner);
            self.release(1);
            return Imported::Duplicate;
        }
        match self.insert_locked(
            &mut inner,
            session.key,
            session.csrf,
            created_at,
            last_seen,
            &session.identity,
        ) {
            Ok(()) => Imported::Added,
            // The place was given back; no slot can be numbered: the store is full.
            Err(_) => Imported::Full,
        }
    }
}

/// Runs `tick(store)` every `interval` (at least 10 ms; the first run one interval after the
/// start) until `store` is dropped: the task holds only a weak reference, so it never keeps a
/// store alive. Shared by the session stores' background maintenance.
pub(crate) fn spawn_periodic<S, F, Fut>(
    store: &Arc<S>,
    interval: Duration,
    mut tick: F,
) -> tokio::task::JoinHandle<()>
where
    S: Send + Sync + 'static,
    F: FnMut(Arc<S>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let weak = Arc::downgrade(store);
    let interval = interval.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            let Some(store) = weak.upgrade() else {
                return;
            };
            tick(store).await;
        }
    })
}

impl SessionStore for MemorySessionStore {
    fn create<'a>(
        &'a self,
        identity: &'a Identity,
        now: u64,
    ) -> BoxFuture<'a, Result<(SessionId, Session), StoreError>> {
        Box::pin(std::future::ready(self.create_sync(identity, now)))
    }

    fn get<'a>(
        &'a self,
        id: &'a SessionId,
        now: u64,
        touch: bool,
    ) -> BoxFuture<'a, Result<Option<Session>, StoreError>> {
        Box::pin(std::future::ready(Ok(self.get_sync(id, now, touch))))
    }

    fn get_for_request<'a>(&'a self, id: &'a SessionId, now: u64, touch: bool) -> Lookup<'a> {
        Lookup::Ready(Some(Ok(self.get_for_request_sync(id, now, touch))))
    }

    fn delete<'a>(&'a self, id: &'a SessionId) -> BoxFuture<'a, Result<(), StoreError>> {
        self.delete_sync(id);
        Box::pin(std::future::ready(Ok(())))
    }

    fn delete_user<'a>(&'a self, user: &'a str) -> BoxFuture<'a, Result<usize, StoreError>> {
        Box::pin(std::future::ready(Ok(self.delete_user_sync(user))))
    }

    fn count(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(std::future::ready(Ok(self.live.load(Ordering::Acquire))))
    }

    fn ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(std::future::ready(true))
    }

    /// Sessions already issued get the new lifetimes at their next lookup (their expiry is
    /// worked out from their login and last use). A session a shorter lifetime ended is
    /// refused at once, and when either lifetime is shorter every session is queued again at
    /// its new expiry (`MemorySessionStore::requeue_all`), so the sweeper (and a full
    /// store's reclaim at login) frees the ended ones' places in `max_sessions` at once, not
    /// at the expiry they were queued at. A longer lifetime keeps a session the old one would
    /// have ended (the sweeper queues it again at its new expiry when its entry comes due).
    fn set_timeouts(&self, timeouts: SessionTimeouts) -> bool {
        let before = self.timeouts.get();
        self.timeouts.set(timeouts);
        if timeouts.idle < before.idle || timeouts.absolute < before.absolute {
            self.requeue_all();
            // Sessions the shorter lifetime ended may expire at or before the last reclaim's
            // second: the next full store's login reclaims, even within that second.
            self.last_reclaim.store(0, Ordering::Release);
        }
        true
    }

    /// The next login of each user counts its live sessions against the new cap; sessions
    /// held above a lowered one are kept until that user's next login ends the oldest.
    fn set_max_sessions_per_user(&self, max: usize) -> bool {
        self.max_per_user.store(max.max(1), Ordering::Relaxed);
        true
    }

    fn as_memory(&self) -> Option<&MemorySessionStore> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> MemorySessionStore {
        MemorySessionStore::new(
            SessionTimeouts {
                idle: Duration::from_secs(60),
                absolute: Duration::from_secs(600),
            },
            100,
        )
    }

    /// The store holds SHA-256(id), never the id: nothing in it can be replayed as a cookie.
    #[test]
    fn store_is_keyed_by_hash_not_by_raw_id() {
        let store = store();
        let identity = Identity::new("alice", ["admin"]);
        let (id, _) = store.create_sync(&identity, 1000).unwrap();
        let hash = id.store_key();
        assert_ne!(hash, id.raw);
        let inner = store.shard(&hash).read();
        assert_eq!(inner.index.get(&index_key(&hash)), Some(&0));
        assert!(!inner.index.contains_key(&index_key(&id.raw)));
        let slot = &inner.slots[0];
        assert_eq!(slot.key, hash);
        // No slot field holds the raw id or its cookie text.
        assert_ne!(slot.key, id.raw);
        assert_ne!(slot.csrf, id.raw);
        assert!(!slot
            .identity
            .as_deref()
            .unwrap_or("")
            .contains(id.as_cookie_value()));
        drop(inner);
        // No shard has anything keyed by the raw id.
        for shard in store.shards.iter() {
            assert!(!shard.read().index.contains_key(&index_key(&id.raw)));
        }
        // Presenting the hash as if it were an id finds nothing.
        let as_cookie = URL_SAFE_NO_PAD.encode(hash);
        let forged = SessionId::parse(&as_cookie).unwrap();
        assert!(store.get_sync(&forged, 1000, false).is_none());
        assert!(store.get_sync(&id, 1000, false).is_some());
    }

    #[test]
    fn removed_slots_are_wiped_and_reused() {
        let store = store();
        let identity = Identity::new("bob", Vec::<String>::new());
        let (a, _) = store.create_sync(&identity, 1000).unwrap();
        let shard = shard_of(&a.store_key());
        store.delete_sync(&a);
        {
            let inner = store.shards[shard].read();
            assert_eq!(inner.slots.len(), 1);
            assert_eq!(inner.slots[0].key, [0u8; 32]);
            assert_eq!(inner.slots[0].csrf, [0u8; 32]);
            assert!(inner.users.is_empty());
            assert!(inner.index.is_empty());
        }
        // Create until one lands in the same shard: it takes the freed slot. The misses are
        // deleted again, so the store (max 100) never fills however long the search takes.
        loop {
            let (b, _) = store.create_sync(&identity, 1000).unwrap();
            if shard_of(&b.store_key()) == shard {
                assert_eq!(store.shards[shard].read().slots.len(), 1);
                assert!(store.get_sync(&b, 1000, false).is_some());
                break;
            }
            store.delete_sync(&b);
        }
    }

    /// One id, one spelling: only the canonical 43-character form parses.
    #[test]
    fn session_id_parse_accepts_only_the_canonical_form() {
        let id = SessionId::generate();
        let text = id.as_cookie_value();
        assert_eq!(text.len(), 43);
        let parsed = SessionId::parse(text).unwrap();
        assert_eq!(parsed.raw, id.raw);
        assert_eq!(parsed.store_key(), id.store_key());
        // The last character carries 4 bits of the id and 2 unused bits, which must be zero:
        // 'A' (000000) is canonical, 'B' (000001) is the same bytes with a stray bit.
        let zeros = URL_SAFE_NO_PAD.encode([0u8; 32]);
        assert!(zeros.ends_with('A'));
        assert!(SessionId::parse(&zeros).is_some());
        let stray = format!("{}B", &zeros[..42]);
        assert!(SessionId::parse(&stray).is_none());
        for bad in [
            String::new(),
            text[..42].to_owned(),
            format!("{text}="),
            format!("{}+", &text[..42]),
            format!("{}/", &text[..42]),
            format!("{} ", &text[..42]),
            "é".repeat(21) + "A",
        ] {
            assert!(SessionId::parse(&bad).is_none(), "{bad:?}");
        }
    }

    /// An expiry entry of an ended session must not remove the session that reused its slot,
    /// and a touched session is re-queued, not lost from the queue.
    #[test]
    fn sweeping_skips_stale_entries_and_requeues_touched_sessions() {
        let store = store();
        let identity = Identity::new("dora", ["r"]);
        let (a, _) = store.create_sync(&identity, 1000).unwrap();
        let shard = shard_of(&a.store_key());
        store.delete_sync(&a);
        let b = loop {
            let (b, _) = store.create_sync(&identity, 1050).unwrap();
            if shard_of(&b.store_key()) == shard {
                break b;
            }
            store.delete_sync(&b);
        };
        // a's entry (due at 1060) finds b in the slot: b lives on.
        assert_eq!(store.sweep(1060), 0);
        assert!(store.get_sync(&b, 1060, true).is_some());
        // b was due at 1110 but touched at 1060: re-queued for 1120.
        assert_eq!(store.sweep(1110), 0);
        assert!(store.get_sync(&b, 1110, false).is_some());
        assert_eq!(store.sweep(1120), 1);
        assert!(store.get_sync(&b, 1060, false).is_none());
        assert_eq!(store.live.load(Ordering::Acquire), 0);
        // Only that shard's queue held entries; all are consumed.
        for shard in store.shards.iter() {
            assert!(shard.read().expiry.is_empty());
        }
    }

    /// A reload that shortens a lifetime frees the places of the sessions it ended at once: a
    /// full store's login reclaims them then, not when the old lifetime would have ended
    /// them; the live ones are kept, queued at their new expiry. On the code before, the
    /// third login failed (`session store is full`) until 1060.
    #[test]
    fn a_shortened_lifetime_frees_the_places_of_the_sessions_it_ended() {
        let store = MemorySessionStore::new(
            SessionTimeouts {
                idle: Duration::from_secs(60),
                absolute: Duration::from_secs(600),
            },
            2,
        );
        let identity = Identity::new("erin", ["r"]);
        let (old, _) = store.create_sync(&identity, 1000).unwrap();
        let (used, _) = store.create_sync(&identity, 1000).unwrap();
        assert!(store.get_sync(&used, 1015, true).is_some());
        assert!(store.create_sync(&identity, 1019).is_err(), "full");
        let shorter = SessionTimeouts {
            idle: Duration::from_secs(10),
            absolute: Duration::from_secs(600),
        };
        assert!(SessionStore::set_timeouts(&store, shorter));
        // At 1020 `old` (idle since 1000) has ended; `used` (touched at 1015) lives to 1025.
        let (new, _) = store
            .create_sync(&identity, 1020)
            .expect("the ended session's place is free");
        assert!(store.get_sync(&old, 1020, false).is_none());
        assert!(store.get_sync(&used, 1020, false).is_some());
        assert!(store.get_sync(&new, 1020, false).is_some());
        assert_eq!(store.live.load(Ordering::Acquire), 2);
        // `used` is queued at its new expiry, 1025, not the old 1075.
        assert_eq!(store.sweep(1024), 0);
        assert_eq!(store.sweep(1025), 1);
        assert!(store.get_sync(&used, 1025, false).is_none());
        // A longer lifetime re-queues nothing (and needs not: entries come due early).
        assert!(SessionStore::set_timeouts(
            &store,
            SessionTimeouts {
                idle: Duration::from_secs(60),
                absolute: Duration::from_secs(600),
            }
        ));
        assert_eq!(
            store.sweep(1030),
            0,
            "new, touched never, now lives to 1080"
        );
        assert!(store.get_sync(&new, 1031, false).is_some());
    }

    /// `max_sessions_per_user` ends the oldest login of a second by its login number, and
    /// that order holds across the counter's wrap (u32::MAX, then 0).
    #[test]
    fn the_oldest_login_is_ended_across_the_counter_wrap() {
        assert_eq!(seq_order(u32::MAX, 0), CmpOrdering::Less);
        assert_eq!(seq_order(0, u32::MAX), CmpOrdering::Greater);
        assert_eq!(seq_order(7, 7), CmpOrdering::Equal);
        let store = store().with_max_sessions_per_user(2);
        store.login_seq.store(u32::MAX - 1, Ordering::Relaxed);
        let identity = Identity::new("frank", ["r"]);
        let other = Identity::new("gina", ["r"]);
        let (a, _) = store.create_sync(&identity, 1000).unwrap();
        let (b, _) = store.create_sync(&identity, 1000).unwrap();
        let (g, _) = store.create_sync(&other, 1000).unwrap();
        let (c, _) = store.create_sync(&identity, 1000).unwrap();
        assert!(store.get_sync(&a, 1000, false).is_none(), "oldest ended");
        let (d, _) = store.create_sync(&identity, 1000).unwrap();
        assert!(store.get_sync(&b, 1000, false).is_none(), "then the next");
        for live in [&c, &d, &g] {
            assert!(store.get_sync(live, 1000, false).is_some());
        }
        assert_eq!(store.live.load(Ordering::Acquire), 3);
        // An expired session is not counted: nothing live is ended for it.
        let (e, _) = store.create_sync(&other, 1050).unwrap();
        assert!(store.get_sync(&g, 1050, false).is_some());
        assert!(store.get_sync(&e, 1050, false).is_some());
        // At 1061 g (idle since 1000) has expired: gina holds one live session, e.
        let (f, _) = store.create_sync(&other, 1061).unwrap();
        assert!(store.get_sync(&e, 1061, false).is_some());
        assert!(store.get_sync(&f, 1061, false).is_some());
    }

    /// A login that ends the user's oldest session keeps that session's place: another login
    /// racing it for a full store never takes the place in between, so the first login never
    /// answers "full" after having ended the old session (a refused login changes nothing).
    #[test]
    fn a_login_that_ends_the_oldest_session_keeps_its_place_in_a_full_store() {
        let store = Arc::new(
            MemorySessionStore::new(
                SessionTimeouts {
                    idle: Duration::from_secs(60),
                    absolute: Duration::from_secs(600),
                },
                2,
            )
            .with_max_sessions_per_user(1),
        );
        let alice = Identity::new("alice", ["r"]);
        let bob = Identity::new("bob", ["r"]);
        store.create_sync(&alice, 1000).unwrap();
        store.create_sync(&bob, 1000).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Carol tries to log in all along: the store is full, so every try must fail.
        let carol = {
            let (store, stop) = (store.clone(), stop.clone());
            std::thread::spawn(move || {
                let carol = Identity::new("carol", ["r"]);
                let mut got_in = 0;
                while !stop.load(Ordering::Relaxed) {
                    if store.create_sync(&carol, 1000).is_ok() {
                        got_in += 1;
                    }
                }
                got_in
            })
        };
        let mut refused = 0;
        for _ in 0..20_000 {
            if store.create_sync(&alice, 1000).is_err() {
                refused += 1;
            }
        }
        stop.store(true, Ordering::Relaxed);
        let carol_got_in = carol.join().unwrap();
        assert_eq!(
            (refused, carol_got_in),
            (0, 0),
            "alice's logins refused after ending her session, carol's logins let in"
        );
        assert_eq!(store.live.load(Ordering::Acquire), 2);
    }

    /// The login number lives in the slot's padding: a session costs what it did.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn the_login_number_fits_the_slot_padding() {
        assert_eq!(std::mem::size_of::<Slot>(), 112);
    }

    #[test]
    fn sessions_of_one_identity_share_the_identity_string() {
        let store = store();
        let identity = Identity::new("carol", ["r"]);
        for _ in 0..(SHARDS * 3) {
            store.create_sync(&identity, 1000).unwrap();
        }
        let shared = store
            .shards
            .iter()
            .map(|shard| shard.read())
            .find(|inner| inner.slots.len() >= 2)
            .map(|inner| {
                let (a, b) = (&inner.slots[0].identity, &inner.slots[1].identity);
                Arc::ptr_eq(a.as_ref().unwrap(), b.as_ref().unwrap())
            });
        assert_eq!(shared, Some(true));
    }
}

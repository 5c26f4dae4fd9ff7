//! The proxy's own endpoints under `/auth/`: login, the current session, logout.
//!
//! The SPA talks to these on its own origin; the browser only ever holds an opaque,
//! `HttpOnly` session cookie, and the SPA holds the CSRF token it got from login or
//! `GET /auth/session`.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use cookie::{Cookie, SameSite};
use http::header::{HeaderValue, CONTENT_TYPE, SET_COOKIE};
use http::{HeaderMap, StatusCode, Uri};
use http_body::Body;
use serde::Deserialize;
use zeroize::{Zeroize as _, Zeroizing};

use crate::core::Identity;

use super::body_memory::ClientKey;
use super::config::DEFAULT_MAX_SESSION_COOKIES;
use super::csrf;
use super::error::{empty_response, json_response, ProxyBody, ProxyError};
use super::forward::{check_transfer_coding, cookie_values, read_body};
use super::metrics::LoginOutcome;
use super::server::{LogUser, ProxyState};
use super::session::{RequestSession, Session, SessionId};
use super::users;

/// Default largest login body (a user name and a password); `auth.max_login_body` sets it.
pub const LOGIN_BODY_LIMIT: usize = super::config::DEFAULT_MAX_LOGIN_BODY;
/// Default longest user name accepted at login (`auth.max_username_bytes` sets it; longer
/// ones are refused before any hash check).
pub const MAX_USERNAME_LEN: usize = super::config::DEFAULT_MAX_USERNAME_BYTES;
/// Default longest password accepted at login (`auth.max_password_bytes` sets it; longer
/// ones are refused before any hash check).
pub const MAX_PASSWORD_LEN: usize = users::DEFAULT_MAX_PASSWORD_BYTES;

/// The session cookie: its name and attributes.
#[derive(Debug, Clone)]
pub struct CookieSettings {
    name: String,
    secure: bool,
    max_age: Duration,
    /// Most distinct session ids one request may carry (`session.max_session_cookies`).
    max_ids: usize,
}

impl CookieSettings {
    /// Over https the cookie is `Secure` and its name gets the `__Host-` prefix (the browser
    /// then refuses it unless Secure, Path=/ and host-only, so a sibling subdomain cannot plant
    /// one). `max_age` is the absolute session lifetime.
    pub fn new(base_name: &str, https: bool, max_age: Duration) -> Self {
        let name = if https && !base_name.starts_with("__Host-") {
            format!("__Host-{base_name}")
        } else {
            base_name.to_owned()
        };
        CookieSettings {
            name,
            secure: https,
            max_age,
            max_ids: DEFAULT_MAX_SESSION_COOKIES,
        }
    }

    /// Sets the most distinct session ids one request's cookies may carry (at least 1; more
    /// are refused as 401 `ambiguous_session_cookie` before any store lookup).
    #[must_use]
    pub fn with_max_ids(mut self, max_ids: usize) -> Self {
        self.max_ids = max_ids.max(1);
        self
    }

    /// The cookie name as sent to the browser.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn header(&self, value: &str, max_age: Duration) -> HeaderValue {
        let cookie = Cookie::build((self.name.as_str(), value))
            .path("/")
            .http_only(true)
            .same_site(SameSite::Strict)
            .secure(self.secure)
            .max_age(cookie::time::Duration::seconds(
                i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX),
            ))
            .build();
        // A base64url id and fixed attributes always form a valid header value.
        HeaderValue::from_str(&cookie.to_string()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// `Set-Cookie` for a new session.
    pub fn set(&self, id: &SessionId) -> HeaderValue {
        self.header(id.as_cookie_value(), self.max_age)
    }

    /// `Set-Cookie` for a new session whose absolute lifetime is `max_age`: the store's at
    /// login, which a reload may have changed since start (`session.absolute_timeout`).
    pub fn set_lasting(&self, id: &SessionId, max_age: Duration) -> HeaderValue {
        self.header(id.as_cookie_value(), max_age)
    }

    /// `Set-Cookie` that removes the cookie.
    pub fn clear(&self) -> HeaderValue {
        self.header("", Duration::ZERO)
    }
}

/// The distinct canonical session ids the request's cookies carry, in the order sent. Values
/// that are not a canonical id are ignored (no session has them); the same id twice counts
/// once.
enum PresentedIds {
    None,
    /// The common case, found without allocating beyond the id itself.
    One(SessionId),
    /// Two to `session.max_session_cookies` ids: the order the browser sent them in decides
    /// nothing.
    Several(Vec<SessionId>),
}

impl PresentedIds {
    fn as_slice(&self) -> &[SessionId] {
        match self {
            PresentedIds::None => &[],
            PresentedIds::One(id) => std::slice::from_ref(id),
            PresentedIds::Several(ids) => ids,
        }
    }
}

/// The session ids the request's cookies carry; more distinct ones than
/// `session.max_session_cookies` are refused as 401 `ambiguous_session_cookie` before any
/// store lookup: each id beyond the first costs a lookup, and a browser holds one session
/// cookie, or a few with a sibling subdomain's or an old `Path`'s beside it
/// (docs/OPERATIONS.md, "Duplicate session cookies").
fn presented_session_ids(
    state: &ProxyState,
    headers: &HeaderMap,
) -> Result<PresentedIds, ProxyError> {
    presented_ids(headers, state.cookie.name(), state.cookie.max_ids)
}

/// [`presented_session_ids`] for the cookie name `name` and at most `max_ids` ids.
fn presented_ids(
    headers: &HeaderMap,
    name: &str,
    max_ids: usize,
) -> Result<PresentedIds, ProxyError> {
    let mut values = cookie_values(headers, name);
    let Some(first) = values.by_ref().find_map(SessionId::parse) else {
        return Ok(PresentedIds::None);
    };
    // Empty until a second distinct id turns up: no allocation for one cookie.
    let mut others: Vec<SessionId> = Vec::new();
    for value in values {
        // Canonical ids have one spelling: equal text is the same id (checked before parsing,
        // so a repeated id costs no copy).
        if value == first.as_cookie_value() || others.iter().any(|id| id.as_cookie_value() == value)
        {
            continue;
        }
        let Some(id) = SessionId::parse(value) else {
            continue;
        };
        if 1 + others.len() >= max_ids {
            return Err(ProxyError::AmbiguousSessionCookie);
        }
        others.push(id);
    }
    if others.is_empty() {
        return Ok(PresentedIds::One(first));
    }
    others.insert(0, first);
    Ok(PresentedIds::Several(others))
}

/// The id of the request's session: the one canonical id its cookies carry (not looked up
/// here: the caller's lookup is the only one, as with a single cookie); of several, the one
/// that names a live session (each looked up without extending it). Two or more live:
/// `ambiguous_session_cookie`, having changed nothing (a sibling subdomain's cookie must not
/// be able to choose the session the browser's requests run under, nor shadow the real one).
async fn session_cookie_id(
    state: &ProxyState,
    headers: &HeaderMap,
    now: u64,
) -> Result<Option<SessionId>, ProxyError> {
    match presented_session_ids(state, headers)? {
        PresentedIds::None => Ok(None),
        PresentedIds::One(id) => Ok(Some(id)),
        PresentedIds::Several(ids) => {
            let mut live = None;
            for id in ids {
                if request_session(state, &id, now, false).await?.is_some() {
                    if live.is_some() {
                        return Err(ProxyError::AmbiguousSessionCookie);
                    }
                    live = Some(id);
                }
            }
            Ok(live)
        }
    }
}

/// The users file sessions are checked against on lookup (`SessionStore::get_checked`): the
/// proxy's, unless `verify_url` checks the logins (then no session was stamped from it).
fn users_file(state: &ProxyState) -> Option<&users::UsersHandle> {
    match state.verify_url {
        Some(_) => None,
        None => state.users.as_ref(),
    }
}

/// The session named by the request's cookie, if it is live (and, with a users file, its user
/// is in the file as at login: `SessionStore::get_checked`). `touch` extends its idle expiry.
/// Several session cookies: the one live session they name is used; two live ones are refused
/// (`ambiguous_session_cookie`; docs/OPERATIONS.md, "Duplicate session cookies").
pub async fn current_session(
    state: &ProxyState,
    headers: &HeaderMap,
    now: u64,
    touch: bool,
) -> Result<Option<(SessionId, Session)>, ProxyError> {
    let Some(id) = session_cookie_id(state, headers, now).await? else {
        return Ok(None);
    };
    let session = state
        .sessions
        .get_checked(&id, now, touch, users_file(state))
        .await?;
    Ok(session.map(|s| (id, s)))
}

/// [`current_session`] for the proxied request path: the session as a [`RequestSession`]
/// (identity kept encoded, CSRF token not copied into text).
pub async fn current_request_session(
    state: &ProxyState,
    headers: &HeaderMap,
    now: u64,
    touch: bool,
) -> Result<Option<(SessionId, RequestSession)>, ProxyError> {
    let Some(id) = session_cookie_id(state, headers, now).await? else {
        return Ok(None);
    };
    let session = request_session(state, &id, now, touch).await?;
    Ok(session.map(|s| (id, s)))
}

/// The live session `id` for the proxied request path, checked as [`current_session`] does.
pub async fn request_session(
    state: &ProxyState,
    id: &SessionId,
    now: u64,
    touch: bool,
) -> Result<Option<RequestSession>, ProxyError> {
    Ok(state
        .sessions
        .get_for_request_checked(id, now, touch, users_file(state))
        .await?)
}

#[derive(Deserialize)]
struct LoginRequest {
    username: String,
    password: String,
}

impl Drop for LoginRequest {
    fn drop(&mut self) {
        self.password.zeroize();
    }
}

#[derive(Deserialize)]
struct VerifyAnswer {
    user: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// `POST /auth/login`.
pub(crate) async fn login<B>(
    state: &ProxyState,
    headers: &HeaderMap,
    body: B,
    client_ip: IpAddr,
    request_id: &HeaderValue,
    user_for_log: &mut LogUser,
) -> Result<http::Response<ProxyBody>, ProxyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // JSON only: an HTML form cannot send it cross-site without a preflight.
    if !is_json(headers) {
        return Err(ProxyError::UnsupportedMediaType);
    }
    // No login CSRF: a foreign page must not log the browser into the attacker's account.
    csrf::check_origin(headers, &state.public_origin)?;
    // The sessions this login replaces (below); too many session cookies are refused before
    // anything is read or counted.
    let old_ids = presented_session_ids(state, headers)?;
    // A body framed by another coding than `chunked` (`gzip, chunked`) would be read still
    // encoded, as the credentials: refused, as on the proxied routes.
    check_transfer_coding(headers)?;
    let raw = Zeroizing::new(Vec::from(
        read_limited(state, headers, body, state.max_login_body, client_ip).await?,
    ));
    // An object only: serde's derived struct also takes an array of the values in field order
    // (`["alice","pw"]`), which is not the documented body, and which a filter in front of
    // the proxy looking for the `username` key would not see.
    let object = raw
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|&first| first == b'{');
    let request: Option<LoginRequest> = object.then(|| serde_json::from_slice(&raw).ok()).flatten();
    let request = request.ok_or_else(|| {
        ProxyError::BadRequest("login body must be {\"username\",\"password\"}".into())
    })?;
    // An empty password is no credential (`hash-password` refuses one, so no user of a users
    // file has it), and a `verify_url` API checking passwords with an LDAP simple bind would
    // take it for an unauthenticated bind, which succeeds (RFC 4513 §5.1.2): refused here,
    // before the throttle and any credential check.
    if request.username.is_empty()
        || request.username.len() > state.max_username_bytes
        || request.password.is_empty()
        || request.password.len() > state.max_password_bytes
    {
        return Err(ProxyError::BadRequest(
            "user name or password length".into(),
        ));
    }
    // The name typed is logged only when it is a user's name in the users file (as it is
    // now): people type their password into the name field (a slip of the tab key, a
    // password manager filling the wrong field), and the access log, read by more people
    // and kept longer than the users file, must not hold it. A name that is no user's is
    // logged `-` (the line's `reason`, `invalid_credentials`, says the login failed); with
    // `verify_url` the proxy cannot tell, so only the session's user, once the API has
    // accepted the login, is logged. One hash lookup, as the password check makes anyway.
    if users_file(state).is_some_and(|users| users.load().get(&request.username).is_some()) {
        *user_for_log = LogUser::Name(request.username.as_str().into());
    }

    let now = state.clock.now_unix();
    // Admitted and counted as a failure in one step, before the password is checked: attempts
    // in flight at once cannot all pass a check that the first one's failure has not reached
    // yet. The count is taken back below unless the password turns out wrong.
    if let Some(retry_after) = state
        .throttle
        .admit(client_ip, &request.username, now)
        .await?
    {
        state.metrics.record_login(LoginOutcome::Throttled);
        return Err(ProxyError::TooManyAttempts {
            retry_after: retry_after.max(1),
        });
    }
    let checked =
        check_credentials(state, &request.username, &request.password, request_id, now).await;
    let (identity, users_seen) = match checked {
        Ok(Some(checked)) => checked,
        Ok(None) => {
            state.metrics.record_login(LoginOutcome::Failed);
            return Err(ProxyError::InvalidCredentials);
        }
        Err(error) => {
            // Not a wrong password (overloaded, or the verifier failed): not a failure. The
            // answer is this error even if the count cannot be taken back (it then stays
            // counted, the safe side). A request cancelled while its password is checked also
            // stays counted, so dropping connections mid-check gains a guesser nothing.
            if let Err(release) = state
                .throttle
                .release(client_ip, &request.username, now)
                .await
            {
                tracing::warn!(error = %release, "login throttle: could not take back a count");
            }
            return Err(error);
        }
    };
    // The password was right: the login goes on even if the throttle cannot be told so. The
    // count then stays (one failure too many, the safe side, as above); answering 503 to a
    // right password would have kept it too, and failed the login as well.
    if let Err(release) = state
        .throttle
        .release(client_ip, &request.username, now)
        .await
    {
        tracing::warn!(error = %release, "login throttle: could not take back a count");
    } else if let Err(success) = state
        .throttle
        .record_success(client_ip, &request.username)
        .await
    {
        tracing::warn!(error = %success, "login throttle: could not clear the user's count");
    }

    // A fresh id at every login (no fixation); the browser's previous session, if any, ends:
    // also one this proxy's users file no longer accepts (a session refused on lookup is not
    // deleted, but this browser is replacing it). Deleting an absent id is harmless. With
    // several session cookies, every session they name ends (at most max_session_cookies):
    // the browser holds them all and is replacing them, and a live one tossed in by a sibling
    // subdomain would otherwise make every request after this login ambiguous.
    for old_id in old_ids.as_slice() {
        state.sessions.delete(old_id).await?;
    }
    // The user's stamp in the users file the password was checked against: lookups compare
    // it with the file they have (sessions in Redis outlive this proxy and its file).
    let stamp = users_seen
        .as_ref()
        .and_then(|seen| seen.stamp_of(&identity.user));
    // The session's clock starts now, not when the login began: the credential check (argon2,
    // or a `verify_url` round trip) can take seconds on a loaded machine, and a session dated
    // from before it could be idle-expired on arrival with a short `idle_timeout`.
    let created = state.clock.now_unix();
    let (id, session) = state
        .sessions
        .create_stamped(&identity, stamp, created)
        .await?;
    // A users-file reload that removed or changed this user while the password was checked
    // may have ended the user's sessions before this one existed (users::UsersSeen): end it.
    if let (Some(seen), Some(users)) = (&users_seen, &state.users) {
        if !seen.still_current(users, &identity.user) {
            state.sessions.delete(&id).await?;
            state.metrics.record_login(LoginOutcome::Failed);
            return Err(ProxyError::InvalidCredentials);
        }
    }
    state.metrics.record_login(LoginOutcome::Ok);
    *user_for_log = LogUser::Name(session.user.clone());
    let mut response = session_response(&session);
    response.headers_mut().insert(
        SET_COOKIE,
        state.cookie.set_lasting(
            &id,
            Duration::from_secs(
                session
                    .absolute_expires_at
                    .saturating_sub(session.created_at),
            ),
        ),
    );
    Ok(response)
}

/// `GET /auth/session` (`?touch=false` reads without extending the idle expiry).
pub(crate) async fn session(
    state: &ProxyState,
    uri: &Uri,
    headers: &HeaderMap,
    user_for_log: &mut LogUser,
) -> Result<http::Response<ProxyBody>, ProxyError> {
    // The answer carries the CSRF token: a read from another origin (a same-site sibling page
    // gets the cookie sent) is refused before the session is looked up or extended.
    csrf::check_read_origin(headers, &state.public_origin)?;
    let touch = query_flag(uri, "touch") != Some(false);
    let now = state.clock.now_unix();
    let (_, session) = current_session(state, headers, now, touch)
        .await?
        .ok_or(ProxyError::Unauthenticated)?;
    *user_for_log = LogUser::Name(session.user.clone());
    Ok(session_response(&session))
}

/// `POST /auth/logout` (`?all=true` ends every session of the user).
pub(crate) async fn logout(
    state: &ProxyState,
    uri: &Uri,
    headers: &HeaderMap,
    user_for_log: &mut LogUser,
) -> Result<http::Response<ProxyBody>, ProxyError> {
    // Logout changes state, so a foreign page must not be able to trigger it: cross-origin
    // first (a forged request usually arrives without the SameSite=Strict cookie), then the
    // session's token.
    csrf::check_origin(headers, &state.public_origin)?;
    let now = state.clock.now_unix();
    let (id, session) = logout_session(state, headers, now).await?;
    *user_for_log = LogUser::Name(session.user.clone());
    csrf::check_token(headers, &session.csrf_token)?;
    if logout_all(uri)? {
        let ended = state.sessions.delete_user(&session.user).await?;
        tracing::info!(
            user = session.user.as_str(),
            ended,
            "logout of every session"
        );
    } else {
        state.sessions.delete(&id).await?;
    }
    let mut response = empty_response(StatusCode::NO_CONTENT);
    response
        .headers_mut()
        .insert(SET_COOKIE, state.cookie.clear());
    Ok(response)
}

/// The session a logout ends. One session cookie (or one live session among several): that
/// session, as for any request. Several live ones: the one whose CSRF token the request
/// carries (the SPA holds the token of its own session only), so a logout ends only a session
/// it can attribute; a token of none of them is a CSRF failure, and nothing ends. Nothing is
/// touched.
async fn logout_session(
    state: &ProxyState,
    headers: &HeaderMap,
    now: u64,
) -> Result<(SessionId, Session), ProxyError> {
    let ids = match presented_session_ids(state, headers)? {
        PresentedIds::None => return Err(ProxyError::Unauthenticated),
        PresentedIds::One(id) => {
            let session = state
                .sessions
                .get_checked(&id, now, false, users_file(state))
                .await?
                .ok_or(ProxyError::Unauthenticated)?;
            return Ok((id, session));
        }
        PresentedIds::Several(ids) => ids,
    };
    let mut live = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(session) = state
            .sessions
            .get_checked(&id, now, false, users_file(state))
            .await?
        {
            live.push((id, session));
        }
    }
    if live.len() <= 1 {
        return live.pop().ok_or(ProxyError::Unauthenticated);
    }
    let mut refused = ProxyError::Csrf("X-CSRF-Token does not match the session");
    for (id, session) in live {
        match csrf::check_token(headers, &session.csrf_token) {
            Ok(()) => return Ok((id, session)),
            Err(error) => refused = error,
        }
    }
    Err(refused)
}

/// The identity of a login that passed, and (users file only) the users it was checked
/// against.
async fn check_credentials(
    state: &ProxyState,
    username: &str,
    password: &str,
    request_id: &HeaderValue,
    now: u64,
) -> Result<Option<(Identity, Option<users::UsersSeen>)>, ProxyError> {
    if state.verify_url.is_some() {
        let identity = verify_remotely(state, username, password, request_id, now).await?;
        return Ok(identity.map(|identity| (identity, None)));
    }
    match &state.users {
        Some(users) => Ok(users::check_login(users, username, password)
            .await
            .map(|(identity, seen)| (identity, Some(seen)))),
        None => Ok(None),
    }
}

/// `[auth] verify_url`: the API checks the credentials. The proxy POSTs them signed, without a
/// user identity; 200 `{"user","roles"}` accepts, 401/403 refuse, anything else is a gateway
/// error (never a silent refusal, so an outage is visible).
async fn verify_remotely(
    state: &ProxyState,
    username: &str,
    password: &str,
    request_id: &HeaderValue,
    now: u64,
) -> Result<Option<Identity>, ProxyError> {
    // Written straight into one buffer of its final size (JSON escapes take at most 6 bytes per
    // input byte), which the request body owns and zeroizes when dropped: no unzeroized copy
    // of the password in a `serde_json::Value`, a reallocated buffer, or a second body buffer.
    #[derive(serde::Serialize)]
    struct Credentials<'a> {
        username: &'a str,
        password: &'a str,
    }
    let capacity = 32 + 6 * (username.len() + password.len());
    let mut body = Zeroizing::new(Vec::with_capacity(capacity));
    serde_json::to_writer(&mut *body, &Credentials { username, password })
        .map_err(|e| ProxyError::Internal(format!("encoding credentials: {e}")))?;
    let (status, answer) = state
        .forwarder
        .post_signed_json(
            Bytes::from_owner(body),
            request_id,
            now,
            state.verify_timeout,
            state.max_verify_answer,
        )
        .await?;
    match status {
        StatusCode::OK => {
            let answer: VerifyAnswer =
                serde_json::from_slice(&answer).map_err(|_| ProxyError::BadGateway {
                    upstream: "verify_url".into(),
                    detail: "answer is not {\"user\",\"roles\"}".into(),
                })?;
            let identity = Identity::new(answer.user, answer.roles);
            // An empty user or role name could never be signed (docs/PROTOCOL.md §4): refuse
            // the answer here rather than create a session that fails every request.
            identity.validate().map_err(|e| ProxyError::BadGateway {
                upstream: "verify_url".into(),
                detail: format!("answer's identity cannot be signed: {e}"),
            })?;
            Ok(Some(identity))
        }
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Ok(None),
        other => Err(ProxyError::BadGateway {
            upstream: "verify_url".into(),
            detail: format!("answered {other}"),
        }),
    }
}

fn session_response(session: &Session) -> http::Response<ProxyBody> {
    let body = serde_json::json!({
        "user": session.user,
        "roles": session.roles,
        "expires_at": session.expires_at(),
        "csrf_token": session.csrf_token,
    });
    json_response(StatusCode::OK, Bytes::from(body.to_string()))
}

async fn read_limited<B>(
    state: &ProxyState,
    headers: &HeaderMap,
    body: B,
    limit: usize,
    client_ip: IpAddr,
) -> Result<Bytes, ProxyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // The body is copied out at once (and wiped when done): its share of
    // `server.max_body_memory` is needed only while it is read. Nobody is signed in yet:
    // its client, for `server.max_body_memory_per_client`, is its address.
    let mut share = state
        .server_settings
        .body_share(ClientKey::address(client_ip));
    tokio::time::timeout(
        state.request_timeout(),
        read_body(headers, body, limit, &mut share),
    )
    .await
    .map_err(|_| ProxyError::RequestTimeout)?
}

/// Whether the request has exactly one `Content-Type` field and its essence is
/// `application/json`. Two fields (a singleton field repeated) are not JSON, whatever their
/// order: a reader in front of the proxy taking the last one would see another body type.
fn is_json(headers: &HeaderMap) -> bool {
    let mut types = headers.get_all(CONTENT_TYPE).iter();
    let (Some(only), None) = (types.next(), types.next()) else {
        return false;
    };
    only.to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// `?all=`: whether a logout ends every session of the user. Absent: no. A value other than
/// `true`/`1`/`false`/`0`, or values that disagree, are refused (400, nothing ended): "log out
/// everywhere" misread as "log out here" would answer success and leave the other sessions
/// live.
fn logout_all(uri: &Uri) -> Result<bool, ProxyError> {
    let Some(query) = uri.query() else {
        return Ok(false);
    };
    let mut all = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key != "all" {
            continue;
        }
        let flag = match value.as_ref() {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => {
                return Err(ProxyError::BadRequest(
                    "logout: ?all= is not true or false".into(),
                ))
            }
        };
        if all.is_some_and(|seen| seen != flag) {
            return Err(ProxyError::BadRequest(
                "logout: ?all= given twice, differently".into(),
            ));
        }
        all = Some(flag);
    }
    Ok(all.unwrap_or(false))
}

/// `Some(value)` when the query has `name=true` or `name=false` (also `1`/`0`).
fn query_flag(uri: &Uri, name: &str) -> Option<bool> {
    let query = uri.query()?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| match v.as_ref() {
            "true" | "1" => Some(true),
            "false" | "0" => Some(false),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "sid";

    fn headers(fields: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for field in fields {
            headers.append(http::header::COOKIE, HeaderValue::from_str(field).unwrap());
        }
        headers
    }

    /// The ids `presented_ids` finds under the default cap, as text, or the error's code.
    fn presented(fields: &[&str]) -> Result<Vec<String>, &'static str> {
        presented_capped(fields, DEFAULT_MAX_SESSION_COOKIES)
    }

    /// [`presented`] with a cap of `max_ids`.
    fn presented_capped(fields: &[&str], max_ids: usize) -> Result<Vec<String>, &'static str> {
        match presented_ids(&headers(fields), NAME, max_ids) {
            Ok(ids) => {
                let texts: Vec<String> = ids
                    .as_slice()
                    .iter()
                    .map(|id| id.as_cookie_value().to_owned())
                    .collect();
                // One id is always `One`, never a `Several` of one.
                assert_eq!(matches!(ids, PresentedIds::Several(_)), texts.len() > 1);
                Ok(texts)
            }
            Err(error) => Err(error.code()),
        }
    }

    /// A fresh canonical id, as text.
    fn id() -> String {
        SessionId::generate().as_cookie_value().to_owned()
    }

    #[test]
    fn no_canonical_id_is_none() {
        assert_eq!(presented(&[]), Ok(vec![]));
        assert_eq!(presented(&["a=1; b=2"]), Ok(vec![]));
        assert_eq!(presented(&["sid=garbage; sid=; sid", "sidx=x"]), Ok(vec![]));
        // Canonical length, not canonical form (trailing bits set); padded form.
        let not_canonical = format!("sid={}B", "A".repeat(42));
        assert_eq!(presented(&[&not_canonical, "sid=AAAA="]), Ok(vec![]));
    }

    #[test]
    fn one_id_is_found_past_non_canonical_values_and_repeats() {
        let a = id();
        let expected = Ok(vec![a.clone()]);
        assert_eq!(presented(&[&format!("sid={a}")]), expected);
        // A garbage pair first no longer hides it (the first pair used to be the only one).
        assert_eq!(presented(&[&format!("sid=junk; sid={a}")]), expected);
        assert_eq!(presented(&["sid=junk", &format!(" sid = {a} ")]), expected);
        // The same id twice, in one field or two: one id.
        assert_eq!(presented(&[&format!("sid={a}; x=1; sid={a}")]), expected);
        assert_eq!(
            presented(&[&format!("sid={a}"), &format!("sid={a}")]),
            expected
        );
        // Another cookie name with the same value is not a candidate.
        assert_eq!(presented(&[&format!("sid={a}; other={}", id())]), expected);
    }

    #[test]
    fn several_distinct_ids_in_the_order_sent_up_to_the_cap() {
        let ids: Vec<String> = (0..=DEFAULT_MAX_SESSION_COOKIES).map(|_| id()).collect();
        let pairs: Vec<String> = ids.iter().map(|v| format!("sid={v}")).collect();
        assert_eq!(
            presented(&[&format!("{}; {}", pairs[1], pairs[0])]),
            Ok(vec![ids[1].clone(), ids[0].clone()])
        );
        // Across fields, repeats and garbage between them.
        assert_eq!(
            presented(&[
                &format!("{}; sid=x", pairs[0]),
                &format!("{}; {}", pairs[0], pairs[1]),
                &pairs[2],
            ]),
            Ok(ids[..3].to_vec())
        );
        // Exactly the cap: accepted; repeats of them do not count.
        let at_cap = pairs[..DEFAULT_MAX_SESSION_COOKIES].join("; ");
        assert_eq!(
            presented(&[&at_cap]),
            Ok(ids[..DEFAULT_MAX_SESSION_COOKIES].to_vec())
        );
        assert_eq!(
            presented(&[&at_cap, &at_cap, "sid=junk; sid=more-junk"]),
            Ok(ids[..DEFAULT_MAX_SESSION_COOKIES].to_vec())
        );
        // One more distinct id: refused as ambiguous, wherever it is.
        assert_eq!(
            presented(&[&pairs.join("; ")]),
            Err("ambiguous_session_cookie")
        );
        let mut reversed = pairs.clone();
        reversed.reverse();
        assert_eq!(
            presented(&[&reversed[0], &reversed[1..].join(";")]),
            Err("ambiguous_session_cookie")
        );
    }

    /// The configured cap, not a constant: 1 refuses any second distinct id, 2 a third;
    /// repeats and non-canonical values never count.
    #[test]
    fn the_cap_is_the_configured_one() {
        let ids: Vec<String> = (0..3).map(|_| id()).collect();
        let pairs: Vec<String> = ids.iter().map(|v| format!("sid={v}")).collect();
        let one_repeated = format!("{}; sid=junk; {}", pairs[0], pairs[0]);
        assert_eq!(
            presented_capped(&[&one_repeated], 1),
            Ok(vec![ids[0].clone()])
        );
        assert_eq!(
            presented_capped(&[&pairs[..2].join("; ")], 1),
            Err("ambiguous_session_cookie")
        );
        assert_eq!(
            presented_capped(&[&pairs[..2].join("; ")], 2),
            Ok(ids[..2].to_vec())
        );
        assert_eq!(
            presented_capped(&[&pairs.join("; ")], 2),
            Err("ambiguous_session_cookie")
        );
        assert_eq!(presented_capped(&[&pairs.join("; ")], 3), Ok(ids.clone()));
    }

    /// `with_max_ids` never sets a cap of 0 (which would refuse every cookie).
    #[test]
    fn a_cap_of_zero_is_one() {
        let cookie = CookieSettings::new("sid", false, Duration::from_secs(60)).with_max_ids(0);
        assert_eq!(cookie.max_ids, 1);
    }
}

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

use super::csrf;
use super::error::{empty_response, json_response, ProxyBody, ProxyError};
use super::forward::{find_cookie, read_body};
use super::metrics::LoginOutcome;
use super::server::{LogUser, ProxyState};
use super::session::{RequestSession, Session, SessionId};
use super::users;

/// Default largest login body (a user name and a password); `auth.max_login_body` sets it.
pub const LOGIN_BODY_LIMIT: usize = super::config::DEFAULT_MAX_LOGIN_BODY;
/// Default longest user name accepted at login (`auth.max_username_bytes` sets it; longer
/// ones are refused before any hash check).
pub const MAX_USERNAME_LEN: usize = super::config::DEFAULT_MAX_USERNAME_BYTES;
/// Longest password accepted (argon2 cost grows with input; this bounds it).
pub const MAX_PASSWORD_LEN: usize = users::MAX_PASSWORD_BYTES;

/// The session cookie: its name and attributes.
#[derive(Debug, Clone)]
pub struct CookieSettings {
    name: String,
    secure: bool,
    max_age: Duration,
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
        }
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

/// The session id the request's cookie carries, if it has one in the canonical form.
fn cookie_session_id(state: &ProxyState, headers: &HeaderMap) -> Option<SessionId> {
    find_cookie(headers, state.cookie.name()).and_then(SessionId::parse)
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
pub async fn current_session(
    state: &ProxyState,
    headers: &HeaderMap,
    now: u64,
    touch: bool,
) -> Result<Option<(SessionId, Session)>, ProxyError> {
    let Some(id) = cookie_session_id(state, headers) else {
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
    let Some(id) = cookie_session_id(state, headers) else {
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
    let raw = Zeroizing::new(Vec::from(
        read_limited(state, headers, body, state.max_login_body).await?,
    ));
    let request: LoginRequest = serde_json::from_slice(&raw).map_err(|_| {
        ProxyError::BadRequest("login body must be {\"username\",\"password\"}".into())
    })?;
    if request.username.is_empty()
        || request.username.len() > state.max_username_bytes
        || request.password.len() > MAX_PASSWORD_LEN
    {
        return Err(ProxyError::BadRequest(
            "user name or password length".into(),
        ));
    }
    *user_for_log = LogUser::Name(request.username.as_str().into());

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
    let checked = check_credentials(state, &request.username, &request.password, now).await;
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
    state
        .throttle
        .release(client_ip, &request.username, now)
        .await?;
    state
        .throttle
        .record_success(client_ip, &request.username)
        .await?;

    // A fresh id at every login (no fixation); the browser's previous session, if any, ends:
    // also one this proxy's users file no longer accepts (a session refused on lookup is not
    // deleted, but this browser is replacing it). Deleting an absent id is harmless.
    if let Some(old_id) = cookie_session_id(state, headers) {
        state.sessions.delete(&old_id).await?;
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
    let (id, session) = current_session(state, headers, now, false)
        .await?
        .ok_or(ProxyError::Unauthenticated)?;
    *user_for_log = LogUser::Name(session.user.clone());
    csrf::check_token(headers, &session.csrf_token)?;
    if query_flag(uri, "all").unwrap_or(false) {
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

/// The identity of a login that passed, and (users file only) the users it was checked
/// against.
async fn check_credentials(
    state: &ProxyState,
    username: &str,
    password: &str,
    now: u64,
) -> Result<Option<(Identity, Option<users::UsersSeen>)>, ProxyError> {
    if let Some(url) = &state.verify_url {
        let identity = verify_remotely(state, url, username, password, now).await?;
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
    url: &Uri,
    username: &str,
    password: &str,
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
            url,
            Bytes::from_owner(body),
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
) -> Result<Bytes, ProxyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::time::timeout(state.request_timeout, read_body(headers, body, limit))
        .await
        .map_err(|_| ProxyError::RequestTimeout)?
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
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

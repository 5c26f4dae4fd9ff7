//! Adversarial review of the login, logout and CSRF endpoints (`src/proxy/auth.rs`,
//! `src/proxy/csrf.rs`), against a real proxy and upstream on loopback. Each test failed
//! before its fix. Run: `cargo test --all-features --test proxy_auth_review`.
#![cfg(feature = "proxy")]

mod support;

use http::{Method, StatusCode};
use support::*;

/// A login attempt with these header lines (in order) and `body`.
async fn login_with(h: &Harness, headers: &[(&str, &str)], body: &str) -> Reply {
    send(
        h.addr,
        Method::POST,
        "/auth/login",
        headers,
        body.to_owned(),
    )
    .await
}

/// `Content-Type` is a singleton field (RFC 9110 §8.3): a login carrying two is not "one
/// `application/json` body", whichever comes first. The proxy read only the first field, so
/// `application/json` then `text/plain` logged in while a filter or log in front of the proxy
/// reading the last one saw a `text/plain` body; the reverse order was a 415. Both orders are
/// now 415, nothing read or counted (alice still logs in after six of them).
#[tokio::test]
async fn a_login_with_two_content_type_fields_is_refused_in_either_order() {
    let h = Harness::start().await;
    let body = serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string();
    let orders: [[(&str, &str); 2]; 3] = [
        [
            ("content-type", "application/json"),
            ("content-type", "text/plain"),
        ],
        [
            ("content-type", "text/plain"),
            ("content-type", "application/json"),
        ],
        [
            ("content-type", "application/json"),
            ("content-type", "application/json"),
        ],
    ];
    for _ in 0..2 {
        for pair in &orders {
            let headers = [pair[0], pair[1], ("origin", ORIGIN)];
            let r = login_with(&h, &headers, &body).await;
            assert_eq!(
                r.status,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{pair:?}: {}",
                r.text()
            );
            assert_eq!(r.error_code(), "unsupported_media_type", "{pair:?}");
            assert!(r.set_cookie().is_none(), "{pair:?}");
        }
    }
    // One field, as every client sends it: still a login (and none of the above counted).
    let r = login_with(
        &h,
        &[("content-type", "application/json"), ("origin", ORIGIN)],
        &body,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// An empty password is never a credential: `hash-password` refuses to hash one, so no user of
/// a users file has it. With `verify_url` the proxy still sent it to the API, and an API that
/// checks passwords with an LDAP simple bind takes a name with an empty password for an
/// unauthenticated bind, which the directory answers with success (RFC 4513 §5.1.2): any user
/// name logged in. It is refused as the empty user name is, 400 `bad_request` before the
/// throttle and before any credential check: the API sees nothing.
#[tokio::test]
async fn an_empty_password_never_reaches_verify_url() {
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(check_logins_at_the_upstream),
        ..HarnessOptions::default()
    })
    .await;
    for _ in 0..6 {
        let r = h.login_raw("vera", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert_eq!(r.error_code(), "bad_request");
        assert!(r.set_cookie().is_none());
    }
    assert_eq!(
        h.upstream.raw_count(),
        0,
        "the API was asked to check an empty password"
    );
    // Not counted either: the right password still logs in after six of them (5 per name).
    let ok = h.login_raw("vera", "vera-pw").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
}

/// The same with a users file: an empty password answers 400, as an empty name does, and is
/// not counted against the name (five of them do not throttle alice).
#[tokio::test]
async fn an_empty_password_is_a_bad_request_with_a_users_file() {
    let h = Harness::start().await;
    for _ in 0..5 {
        let r = h.login_raw("alice", "").await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert_eq!(r.error_code(), "bad_request");
    }
    assert_eq!(
        h.login_raw("alice", ALICE_PASSWORD).await.status,
        StatusCode::OK
    );
}

/// `POST /auth/logout` with `cookie`, `token` and the public origin, to `path`.
async fn logout_at(h: &Harness, path: &str, login: &Login) -> Reply {
    send(
        h.addr,
        Method::POST,
        path,
        &[
            ("cookie", &login.cookie),
            ("x-csrf-token", &login.csrf),
            ("origin", ORIGIN),
        ],
        bytes::Bytes::new(),
    )
    .await
}

/// "Log out everywhere" (`?all=true`) is what a user reaches for after a suspected
/// compromise. A value the proxy did not understand (`all=yes`, an HTML checkbox's `all=on`,
/// a bare `all`) or two values that disagree (`all=false&all=true`) silently became a logout
/// of this session only, answered 204 as a success, while every other session (the
/// attacker's) stayed live. Such a logout is now 400 `bad_request` and ends nothing; `true`,
/// `1`, `false`, `0` and no `all` at all behave as before.
#[tokio::test]
async fn a_logout_all_flag_the_proxy_cannot_read_ends_nothing() {
    let h = Harness::start().await;
    let mine = h.login("alice", ALICE_PASSWORD).await;
    let other = h.login("alice", ALICE_PASSWORD).await;
    for query in [
        "?all=yes",
        "?all=on",
        "?all",
        "?all=",
        "?all=TRUE",
        "?all=false&all=true",
        "?all=1&all=0",
    ] {
        let r = logout_at(&h, &format!("/auth/logout{query}"), &mine).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{query}: {}", r.text());
        assert_eq!(r.error_code(), "bad_request", "{query}");
        assert!(r.set_cookie().is_none(), "{query}");
        for (name, login) in [("mine", &mine), ("other", &other)] {
            let s = get(h.addr, "/auth/session?touch=false", login).await;
            assert_eq!(s.status, StatusCode::OK, "{query}: {name} ended");
        }
    }
    // A repeated value that agrees, and the documented spellings, still work.
    let r = logout_at(&h, "/auth/logout?all=1&all=true", &mine).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    for login in [&mine, &other] {
        let s = get(h.addr, "/auth/session?touch=false", login).await;
        assert_eq!(s.status, StatusCode::UNAUTHORIZED);
    }
    let one = h.login("alice", ALICE_PASSWORD).await;
    let two = h.login("alice", ALICE_PASSWORD).await;
    let r = logout_at(&h, "/auth/logout?all=false", &one).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(
        get(h.addr, "/auth/session?touch=false", &two).await.status,
        StatusCode::OK
    );
    let r = logout_at(&h, "/auth/logout?other=1", &two).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
}

/// A login throttle whose `release` fails (its store went away between the attempt's
/// admission and the password check's end): everything else is a memory throttle's.
struct ReleaseFails(countersign::proxy::throttle::MemoryLoginThrottle);

impl countersign::proxy::throttle::LoginThrottle for ReleaseFails {
    fn admit<'a>(
        &'a self,
        ip: std::net::IpAddr,
        user: &'a str,
        now: u64,
    ) -> countersign::proxy::session::BoxFuture<
        'a,
        Result<Option<u64>, countersign::proxy::session::StoreError>,
    > {
        self.0.admit(ip, user, now)
    }
    fn release<'a>(
        &'a self,
        _ip: std::net::IpAddr,
        _user: &'a str,
        _admitted_at: u64,
    ) -> countersign::proxy::session::BoxFuture<
        'a,
        Result<(), countersign::proxy::session::StoreError>,
    > {
        Box::pin(async {
            Err(countersign::proxy::session::StoreError::new(
                "throttle store went away",
            ))
        })
    }
    fn check<'a>(
        &'a self,
        ip: std::net::IpAddr,
        user: &'a str,
        now: u64,
    ) -> countersign::proxy::session::BoxFuture<
        'a,
        Result<Option<u64>, countersign::proxy::session::StoreError>,
    > {
        self.0.check(ip, user, now)
    }
    fn record_failure<'a>(
        &'a self,
        ip: std::net::IpAddr,
        user: &'a str,
        now: u64,
    ) -> countersign::proxy::session::BoxFuture<
        'a,
        Result<(), countersign::proxy::session::StoreError>,
    > {
        self.0.record_failure(ip, user, now)
    }
    fn record_success<'a>(
        &'a self,
        ip: std::net::IpAddr,
        user: &'a str,
    ) -> countersign::proxy::session::BoxFuture<
        'a,
        Result<(), countersign::proxy::session::StoreError>,
    > {
        self.0.record_success(ip, user)
    }
    fn set_limits(&self, limits: countersign::proxy::config::ThrottleConfig) {
        self.0.set_limits(limits)
    }
}

/// A right password whose count the throttle cannot take back (its store failed after the
/// attempt was admitted) answered 503 `session_store_unavailable`: the login failed, and the
/// count stayed anyway. The count staying is the safe side (one failure too many, as for a
/// check that errs); the login now goes on and answers 200 with a session.
#[tokio::test]
async fn a_right_password_logs_in_when_the_throttle_cannot_take_its_count_back() {
    let throttle = ReleaseFails(countersign::proxy::throttle::MemoryLoginThrottle::new(
        countersign::proxy::config::ThrottleConfig::default(),
        100,
    ));
    let h = Harness::start_with(HarnessOptions {
        throttle: Some(std::sync::Arc::new(throttle)),
        ..HarnessOptions::default()
    })
    .await;
    let r = h.login_raw("alice", ALICE_PASSWORD).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // The session it made works.
    let alice = h.login("alice", ALICE_PASSWORD).await;
    assert_eq!(get(h.addr, "/api/x", &alice).await.status, StatusCode::OK);
    // A wrong password is still 401, the count kept.
    assert_eq!(
        h.login_raw("alice", "wrong").await.status,
        StatusCode::UNAUTHORIZED
    );
}

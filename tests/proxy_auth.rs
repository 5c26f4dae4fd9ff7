//! Login, sessions, expiry, logout, admin revoke — against a real proxy and upstream on
//! loopback. Run: `cargo test --all-features --test proxy_auth`.
#![cfg(feature = "proxy")]

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

#[tokio::test]
async fn login_ok_returns_session_and_strict_cookie() {
    let h = Harness::start().await;
    let r = h.login_raw("alice", ALICE_PASSWORD).await;
    assert_eq!(r.status, StatusCode::OK);
    let body = r.json();
    assert_eq!(body["user"], "alice");
    assert_eq!(body["roles"], serde_json::json!(["admin", "ops team"]));
    assert_eq!(body["expires_at"], T0 + IDLE.as_secs());
    assert_eq!(body["csrf_token"].as_str().unwrap().len(), 43);
    let cookie = r.set_cookie().unwrap();
    assert!(cookie.starts_with("countersign_session="), "{cookie}");
    let attrs: Vec<&str> = cookie.split(';').map(str::trim).collect();
    for wanted in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(attrs.contains(&wanted), "{wanted} missing in {cookie}");
    }
    // Plain-http public origin: no Secure (the browser would drop it), no __Host- prefix.
    assert!(!attrs.contains(&"Secure"), "{cookie}");
    assert_eq!(r.headers["cache-control"], "no-store");

    // The cookie works and a fresh read shows the same session.
    let login = h.login("alice", ALICE_PASSWORD).await;
    let s = get(h.addr, "/auth/session", &login).await;
    assert_eq!(s.status, StatusCode::OK);
    assert_eq!(s.json()["user"], "alice");
    assert_eq!(s.json()["csrf_token"], login.csrf.as_str());
}

#[tokio::test]
async fn wrong_password_and_unknown_user_get_the_same_answer() {
    let h = Harness::start().await;
    let wrong = h.login_raw("alice", "not-her-password").await;
    let unknown = h.login_raw("mallory", "whatever").await;
    for r in [&wrong, &unknown] {
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.text(), r#"{"error":"invalid_credentials"}"#);
        assert!(r.set_cookie().is_none());
    }
    let metrics = h.proxy().state().metrics().render(None, &[]);
    assert!(
        metrics.contains("countersign_logins_total{outcome=\"failed\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn login_is_throttled_per_user_with_retry_after() {
    let h = Harness::start_with(HarnessOptions {
        max_failures_per_user: 3,
        ..HarnessOptions::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            h.login_raw("alice", "wrong").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    // Even the right password is refused while throttled, without a hash check.
    let r = h.login_raw("alice", ALICE_PASSWORD).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "too_many_attempts");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry > 0 && retry <= 900, "{retry}");
    assert!(r.set_cookie().is_none());
    // Another user is not affected.
    assert_eq!(
        h.login_raw("bob", BOB_PASSWORD).await.status,
        StatusCode::OK
    );
    // After the window, alice may log in again.
    h.clock.advance(901);
    assert_eq!(
        h.login_raw("alice", ALICE_PASSWORD).await.status,
        StatusCode::OK
    );
    let metrics = h.proxy().state().metrics().render(None, &[]);
    assert!(
        metrics.contains("countersign_logins_total{outcome=\"throttled\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn login_requires_json_same_origin_and_a_well_formed_body() {
    let h = Harness::start().await;
    let body = serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string();
    let form = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "text/plain")],
        body.clone(),
    )
    .await;
    assert_eq!(form.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(form.error_code(), "unsupported_media_type");
    let none = send(h.addr, Method::POST, "/auth/login", &[], body.clone()).await;
    assert_eq!(none.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Login CSRF: a foreign page posting the attacker's credentials.
    let foreign = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[
            ("content-type", "application/json"),
            ("origin", "http://evil.test"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN);
    assert_eq!(foreign.error_code(), "csrf");
    assert!(foreign.set_cookie().is_none());
    let cross_site = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[
            ("content-type", "application/json"),
            ("sec-fetch-site", "cross-site"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(cross_site.status, StatusCode::FORBIDDEN);
    let malformed = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json")],
        "{\"user\":1}",
    )
    .await;
    assert_eq!(malformed.status, StatusCode::BAD_REQUEST);
    assert_eq!(malformed.error_code(), "bad_request");
    let long_name = serde_json::json!({ "username": "a".repeat(300), "password": "x" }).to_string();
    let r = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json")],
        long_name,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let empty_name = serde_json::json!({ "username": "", "password": "x" }).to_string();
    let r = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json")],
        empty_name,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // `application/json; charset=utf-8` is JSON too.
    let r = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "Application/JSON; charset=utf-8")],
        body.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let huge = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[("content-type", "application/json")],
        vec![b' '; 64 * 1024],
    )
    .await;
    assert_eq!(huge.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Wrong methods and unknown auth paths.
    let r = send(h.addr, Method::GET, "/auth/login", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "POST");
    assert_eq!(r.error_code(), "method_not_allowed");
    let r = send(h.addr, Method::GET, "/auth/nope", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "not_found");
}

/// RFC 9110 section 15.5.2: a 401 MUST carry a challenge. The proxy's is the `Cookie` scheme,
/// which no browser answers with a login dialog; its other refusals carry none.
#[tokio::test]
async fn every_401_of_the_proxy_carries_a_cookie_challenge() {
    let h = Harness::start().await;
    let no_session = send(h.addr, Method::GET, "/api/whoami", &[], Bytes::new()).await;
    let session_endpoint = send(h.addr, Method::GET, "/auth/session", &[], Bytes::new()).await;
    let wrong_password = h.login_raw("alice", "not-her-password").await;
    for (what, r) in [
        ("API call without a session", &no_session),
        ("/auth/session without a session", &session_endpoint),
        ("login with a wrong password", &wrong_password),
    ] {
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
        let challenges: Vec<_> = r.headers.get_all("www-authenticate").iter().collect();
        assert_eq!(challenges, ["Cookie realm=\"countersign\""], "{what}");
    }
    // Not on other refusals: a 403 (no CSRF token) and a 404 ask for no credentials.
    let login = h.login("alice", ALICE_PASSWORD).await;
    let no_csrf = send(
        h.addr,
        Method::POST,
        "/api/echo",
        &[("cookie", &login.cookie), ("origin", ORIGIN)],
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(no_csrf.status, StatusCode::FORBIDDEN);
    let unknown = send(h.addr, Method::GET, "/nowhere", &[], Bytes::new()).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    for r in [&no_csrf, &unknown] {
        assert!(
            r.headers.get("www-authenticate").is_none(),
            "{:?}",
            r.headers
        );
    }
}

#[tokio::test]
async fn session_endpoint_without_cookie_or_with_garbage_is_401() {
    let h = Harness::start().await;
    let r = send(h.addr, Method::GET, "/auth/session", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.text(), r#"{"error":"unauthenticated"}"#);
    let r = send(
        h.addr,
        Method::GET,
        "/auth/session",
        &[("cookie", "countersign_session=forged")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A well-formed but unknown id.
    let unknown = format!("countersign_session={}", "A".repeat(43));
    let r = send(
        h.addr,
        Method::GET,
        "/auth/session",
        &[("cookie", &unknown)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn idle_expiry_and_touch_false() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    // Reading with touch=false does not extend the idle timer...
    h.clock.advance(IDLE.as_secs() - 10);
    let r = get(h.addr, "/auth/session?touch=false", &login).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["expires_at"], T0 + IDLE.as_secs());
    h.clock.advance(20);
    assert_eq!(
        get(h.addr, "/auth/session?touch=false", &login)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(h.addr, "/api/x", &login).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.upstream.raw_count(),
        0,
        "an expired session never reaches the upstream"
    );

    // ...while using the session does.
    let login = h.login("alice", ALICE_PASSWORD).await;
    for _ in 0..3 {
        h.clock.advance(IDLE.as_secs() - 10);
        assert_eq!(get(h.addr, "/api/x", &login).await.status, StatusCode::OK);
    }
    h.clock.advance(IDLE.as_secs() + 1);
    assert_eq!(
        get(h.addr, "/api/x", &login).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn absolute_expiry_ends_a_busy_session() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let step = IDLE.as_secs() / 2;
    let mut elapsed = 0;
    while elapsed + step < ABSOLUTE.as_secs() {
        h.clock.advance(step);
        elapsed += step;
        assert_eq!(
            get(h.addr, "/auth/session", &login).await.status,
            StatusCode::OK,
            "at +{elapsed}s"
        );
    }
    h.clock.set(T0 + ABSOLUTE.as_secs());
    assert_eq!(
        get(h.addr, "/auth/session", &login).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(h.addr, "/api/x", &login).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn login_issues_a_new_id_each_time() {
    let h = Harness::start().await;
    let first = h.login("alice", ALICE_PASSWORD).await;
    // Logging in again from the same browser replaces its session (no fixation).
    let r = send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[
            ("content-type", "application/json"),
            ("cookie", &first.cookie),
        ],
        serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let second = r.session_cookie().unwrap();
    assert_ne!(second, first.cookie);
    assert_eq!(
        get(h.addr, "/auth/session", &first).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn logout_needs_csrf_and_ends_the_session() {
    let h = Harness::start().await;
    let login = h.login("alice", ALICE_PASSWORD).await;
    let other = h.login("alice", ALICE_PASSWORD).await;
    // Without the token, or from another origin: refused, and nothing changes.
    let r = send(
        h.addr,
        Method::POST,
        "/auth/logout",
        &[("cookie", &login.cookie)],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.error_code(), "csrf");
    let r = send(
        h.addr,
        Method::POST,
        "/auth/logout",
        &[
            ("cookie", &login.cookie),
            ("x-csrf-token", &login.csrf),
            ("origin", "http://evil.test"),
        ],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = send(
        h.addr,
        Method::POST,
        "/auth/logout",
        &[("cookie", &login.cookie), ("x-csrf-token", &other.csrf)],
        Bytes::new(),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::FORBIDDEN,
        "another session's token is not this one's"
    );
    assert_eq!(
        get(h.addr, "/auth/session", &login).await.status,
        StatusCode::OK
    );

    let r = post_json(h.addr, "/auth/logout", &login, "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let cleared = r.set_cookie().unwrap();
    assert!(cleared.starts_with("countersign_session=;"), "{cleared}");
    assert!(cleared.contains("Max-Age=0"), "{cleared}");
    assert_eq!(
        get(h.addr, "/auth/session", &login).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(h.addr, "/auth/session", &other).await.status,
        StatusCode::OK,
        "other sessions stay"
    );
    // Logging out again: no session any more, and the 401 clears no cookie (docs/FRONTEND.md:
    // a clearing 401 could land after another tab's login and delete its new cookie).
    let r = post_json(h.addr, "/auth/logout", &login, "").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error_code(), "unauthenticated");
    assert_eq!(r.set_cookie(), None, "a 401 set a cookie");
}

#[tokio::test]
async fn logout_all_ends_every_session_of_the_user() {
    let h = Harness::start().await;
    let a1 = h.login("alice", ALICE_PASSWORD).await;
    let a2 = h.login("alice", ALICE_PASSWORD).await;
    let b = h.login("bob", BOB_PASSWORD).await;
    let r = post_json(h.addr, "/auth/logout?all=true", &a1, "").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        get(h.addr, "/auth/session", &a1).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(h.addr, "/auth/session", &a2).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(h.addr, "/auth/session", &b).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn admin_revoke_health_ready_and_metrics() {
    let h = Harness::start().await;
    let a1 = h.login("alice", ALICE_PASSWORD).await;
    let a2 = h.login("alice", ALICE_PASSWORD).await;
    let b = h.login("bob", BOB_PASSWORD).await;
    assert_eq!(get(h.addr, "/api/x", &a1).await.status, StatusCode::OK);

    let r = send(
        h.admin,
        Method::GET,
        "/admin/users/alice/revoke",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let r = admin_revoke(h.admin, "alice").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json(),
        serde_json::json!({ "user": "alice", "revoked": 2 })
    );
    assert_eq!(
        get(h.addr, "/auth/session", &a1).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(h.addr, "/auth/session", &a2).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(h.addr, "/auth/session", &b).await.status,
        StatusCode::OK
    );

    let r = send(h.admin, Method::GET, "/healthz", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = send(h.admin, Method::GET, "/readyz", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let r = send(h.admin, Method::GET, "/metrics", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = r.text();
    for wanted in [
        "countersign_requests_total{route=\"upstream/api\",status=\"200\"} 1",
        "countersign_requests_total{route=\"auth/login\",status=\"200\"} 3",
        "countersign_logins_total{outcome=\"ok\"} 3",
        "countersign_signatures_issued_total 1",
        "countersign_active_sessions 1",
        "countersign_request_duration_seconds_count",
        "countersign_upstream_errors_total 0",
    ] {
        assert!(text.contains(wanted), "{wanted} missing in\n{text}");
    }
    let r = send(h.admin, Method::GET, "/nope", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    for bad in ["/admin/users//revoke", "/admin/users/%ff%fe/revoke"] {
        let r = send(h.admin, Method::POST, bad, &[], Bytes::new()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.error_code(), "bad_request");
    }
    // Percent-encoded names reach the right user.
    let b2 = h.login("bob", BOB_PASSWORD).await;
    let r = send(
        h.admin,
        Method::POST,
        "/admin/users/b%6Fb/revoke",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.json(), serde_json::json!({ "user": "bob", "revoked": 2 }));
    assert_eq!(
        get(h.addr, "/auth/session", &b2).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn readyz_fails_when_an_upstream_is_down() {
    let (_refusing, dead) = refusing_addr();
    let dead = format!("http://{dead}");
    let h = Harness::start_with(HarnessOptions {
        extra_routes: vec![route("dead", "/dead/", &dead)],
        ..HarnessOptions::default()
    })
    .await;
    let r = send(h.admin, Method::GET, "/readyz", &[], Bytes::new()).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["ready"], false);
    assert_eq!(r.json()["upstreams"]["dead"]["up"], false);
}

#[tokio::test]
async fn verify_url_checks_credentials_at_the_api() {
    let (_refusing, dead) = refusing_addr();
    let dead = format!("http://{dead}/verify-credentials");
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(check_logins_at_the_upstream),
        ..HarnessOptions::default()
    })
    .await;
    let ok = h.login_raw("vera", "vera-pw").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    assert_eq!(ok.json()["user"], "vera");
    assert_eq!(ok.json()["roles"], serde_json::json!(["auditor"]));
    // The credential check was signed (the VerifyLayer let it through) without identity.
    let check = h.upstream.last_verified();
    assert_eq!(check.identity.user, None);
    assert!(check.uri.ends_with("/auth/verify-credentials"));
    // Sessions from it sign the API's answer as usual.
    let login = Login {
        cookie: ok.session_cookie().unwrap(),
        csrf: ok.json()["csrf_token"].as_str().unwrap().to_owned(),
    };
    assert_eq!(get(h.addr, "/api/x", &login).await.json()["user"], "vera");
    // Refused by the API: the usual 401.
    let wrong = h.login_raw("vera", "nope").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.error_code(), "invalid_credentials");
    // The API failing is a gateway error, not a silent refusal.
    let broken = h.login_raw("broken", "x").await;
    assert_eq!(broken.status, StatusCode::BAD_GATEWAY);
    assert_eq!(broken.error_code(), "bad_gateway");
    // So is an answer naming an identity that could never be signed: no session is created.
    for name in ["empty-role", "empty-user"] {
        let unsignable = h.login_raw(name, "x").await;
        assert_eq!(unsignable.status, StatusCode::BAD_GATEWAY, "{name}");
        assert_eq!(unsignable.error_code(), "bad_gateway", "{name}");
        assert!(unsignable.set_cookie().is_none(), "{name}");
    }

    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, _| s.verify_url = Some(dead.parse().unwrap())),
        ..HarnessOptions::default()
    })
    .await;
    let down = h.login_raw("vera", "vera-pw").await;
    assert_eq!(down.status, StatusCode::BAD_GATEWAY);
    assert!(down.set_cookie().is_none());
}

/// A `verify_url` with a query (`?tenant=a`), with or without a path, is asked there: the
/// query is sent and signed, and a URL without a path is asked at `/`.
#[tokio::test]
async fn a_verify_url_with_a_query_is_asked_with_it() {
    for (suffix, asked) in [
        ("?verify-credentials", "/?verify-credentials"),
        ("/?verify-credentials", "/?verify-credentials"),
        (
            "/auth/verify-credentials?tenant=a",
            "/auth/verify-credentials?tenant=a",
        ),
    ] {
        let h = Harness::start_with(HarnessOptions {
            tweak: Box::new(move |s, up| {
                s.verify_url = Some(format!("{}{suffix}", up.url()).parse().unwrap())
            }),
            ..HarnessOptions::default()
        })
        .await;
        let ok = h.login_raw("vera", "vera-pw").await;
        assert_eq!(ok.status, StatusCode::OK, "{suffix}: {}", ok.text());
        // Through the upstream's VerifyLayer: the signature covers the query sent.
        let check = h.upstream.last_verified();
        assert!(check.uri.ends_with(asked), "{suffix}: {}", check.uri);
        assert_eq!(check.identity.user, None);
        assert_eq!(h.upstream.last_raw().uri, asked, "{suffix}");
    }
}

/// A session's clock starts when it is created, not when its login began: a credential check
/// that outlasts the idle timeout (a slow `verify_url`, or argon2 on a loaded machine) once
/// handed out a session already idle-expired, so the SPA's first call after a successful login
/// was a 401 (seen in the browser suite, whose idle timeout is 2 s, on a busy machine).
#[tokio::test]
async fn a_slow_credential_check_does_not_start_the_session_expired() {
    use std::sync::{Arc, OnceLock};

    use countersign::clock::ManualClock;
    use http_body_util::{BodyExt as _, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;

    // The credential check: a server that lets the proxy's clock run past the idle timeout
    // while it "checks", then accepts.
    let clock: Arc<OnceLock<ManualClock>> = Arc::new(OnceLock::new());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let check_url = format!("http://{}/verify", listener.local_addr().unwrap());
    let server_clock = Arc::clone(&clock);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let clock = Arc::clone(&server_clock);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: http::Request<Incoming>| {
                        let clock = Arc::clone(&clock);
                        async move {
                            let _ = request.into_body().collect().await;
                            if let Some(clock) = clock.get() {
                                clock.advance(IDLE.as_secs() + 60);
                            }
                            let answer = serde_json::json!({ "user": "slow", "roles": [] });
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(answer.to_string()),
                            )))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let h = Harness::start_with(HarnessOptions {
        tweak: Box::new(move |s, _| s.verify_url = Some(check_url.parse().unwrap())),
        ..HarnessOptions::default()
    })
    .await;
    clock.set(h.clock.clone()).unwrap();

    let ok = h.login_raw("slow", "pw").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
    let after_check = T0 + IDLE.as_secs() + 60;
    assert_eq!(
        ok.json()["expires_at"],
        after_check + IDLE.as_secs(),
        "the idle timeout counts from the session's creation: {}",
        ok.text()
    );
    let login = Login {
        cookie: ok.session_cookie().unwrap(),
        csrf: ok.json()["csrf_token"].as_str().unwrap().to_owned(),
    };
    let session = get(h.addr, "/auth/session", &login).await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.text());
    assert_eq!(get(h.addr, "/api/x", &login).await.status, StatusCode::OK);
}

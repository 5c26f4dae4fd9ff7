//! Several session cookies of the same name in one request (a sibling subdomain's cookie
//! tossing, a stale cookie with another `Path`): the proxy never lets the order of the pairs
//! pick the session. One live session among them is used; two live ones are refused (401
//! `ambiguous_session_cookie`) and neither is touched. Against a real proxy and upstream on
//! loopback. Run: `cargo test --all-features --test proxy_session_cookie_duplicates`.
#![cfg(feature = "proxy")]

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

/// Distinct canonical session ids beyond which a request is refused unlooked-up
/// (`session.max_session_cookies`, default 4).
const CAP: usize = 4;

const NAME: &str = "countersign_session";

/// A canonical session id no session has (43 base64url characters, zero trailing bits).
fn unknown_id(fill: char) -> String {
    format!("{NAME}={}A", fill.to_string().repeat(42))
}

/// A GET with exactly these `Cookie` fields.
async fn get_with_cookies(h: &Harness, path: &str, fields: &[&str]) -> Reply {
    let headers: Vec<(&str, &str)> = fields.iter().map(|f| ("cookie", *f)).collect();
    send(h.addr, Method::GET, path, &headers, Bytes::new()).await
}

/// `expires_at` of the session as `GET /auth/session?touch=false` reports it.
async fn expires_at(h: &Harness, login: &Login) -> u64 {
    let r = get(h.addr, "/auth/session?touch=false", login).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    r.json()["expires_at"].as_u64().expect("expires_at")
}

/// A login as alice from a browser that sends `cookie`.
async fn login_alice_with_cookie(h: &Harness, cookie: &str) -> Reply {
    send(
        h.addr,
        Method::POST,
        "/auth/login",
        &[
            ("content-type", "application/json"),
            ("origin", ORIGIN),
            ("cookie", cookie),
        ],
        serde_json::json!({ "username": "alice", "password": ALICE_PASSWORD }).to_string(),
    )
    .await
}

fn assert_ambiguous(r: &Reply) {
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text());
    assert_eq!(r.text(), r#"{"error":"ambiguous_session_cookie"}"#);
    assert_eq!(
        r.headers["www-authenticate"],
        "Cookie realm=\"countersign\""
    );
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["cache-control"], "no-store");
    assert!(r.set_cookie().is_none(), "{:?}", r.set_cookie());
}

#[test]
fn the_cap_is_the_proxys_default() {
    assert_eq!(CAP, countersign::proxy::config::DEFAULT_MAX_SESSION_COOKIES);
}

/// `session.max_session_cookies` is the proxy's cap: set to 1, a stale id beside the live
/// one is refused before any lookup (the default 4 uses the live one); set to 2, a third.
#[tokio::test]
async fn the_configured_cap_is_the_one_applied() {
    let capped = |cap: usize| async move {
        Harness::start_with(HarnessOptions {
            tweak: Box::new(move |settings, _| settings.max_session_cookies = cap),
            ..HarnessOptions::default()
        })
        .await
    };
    for cap in [1, 2] {
        let h = capped(cap).await;
        let alice = h.login("alice", ALICE_PASSWORD).await;
        h.clock.advance(50);
        let at_cap: Vec<String> = std::iter::once(alice.cookie.clone())
            .chain(['B', 'C'][..cap - 1].iter().map(|&c| unknown_id(c)))
            .collect();
        let r = get_with_cookies(&h, "/api/items", &[&at_cap.join("; ")]).await;
        assert_eq!(r.status, StatusCode::OK, "cap {cap}: {}", r.text());
        let over = format!("{}; {}", at_cap.join("; "), unknown_id('Z'));
        let upstream_before = h.upstream.raw_count();
        let touched = expires_at(&h, &alice).await;
        h.clock.advance(50);
        let r = get_with_cookies(&h, "/api/items", &[&over]).await;
        assert_ambiguous(&r);
        assert_eq!(h.upstream.raw_count(), upstream_before, "cap {cap}");
        assert_eq!(
            expires_at(&h, &alice).await,
            touched,
            "cap {cap}: not touched"
        );
        // The login beyond the cap: refused before the password is checked.
        let r = login_alice_with_cookie(&h, &over).await;
        assert_ambiguous(&r);
    }
}

#[tokio::test]
async fn two_live_sessions_are_refused_and_neither_is_extended() {
    let h = Harness::start().await;
    let alice = h.login("alice", ALICE_PASSWORD).await;
    let bob = h.login("bob", BOB_PASSWORD).await;
    h.clock.advance(100);
    let upstream_before = h.upstream.raw_count();

    let both = format!("{}; {}", alice.cookie, bob.cookie);
    let reversed = format!("{}; {}", bob.cookie, alice.cookie);
    for fields in [
        vec![both.as_str()],
        vec![reversed.as_str()],
        // One pair per field, as HTTP/2 sends them.
        vec![alice.cookie.as_str(), bob.cookie.as_str()],
        vec![bob.cookie.as_str(), alice.cookie.as_str()],
        // With garbage and a stale id around them.
        vec![
            "countersign_session=junk; theme=dark",
            &both,
            &unknown_id('Q'),
        ],
    ] {
        for path in ["/api/items", "/auth/session", "/auth/session?touch=false"] {
            let r = get_with_cookies(&h, path, &fields).await;
            assert_ambiguous(&r);
        }
    }
    // A state-changing request with either session's token: refused the same way.
    for token in [&alice.csrf, &bob.csrf] {
        let r = send(
            h.addr,
            Method::POST,
            "/api/items",
            &[
                ("cookie", &both),
                ("x-csrf-token", token),
                ("origin", ORIGIN),
                ("content-type", "application/json"),
            ],
            "{}",
        )
        .await;
        assert_ambiguous(&r);
    }
    assert_eq!(
        h.upstream.raw_count(),
        upstream_before,
        "nothing went upstream"
    );
    // Neither session was extended by the refused requests.
    assert_eq!(expires_at(&h, &alice).await, T0 + IDLE.as_secs());
    assert_eq!(expires_at(&h, &bob).await, T0 + IDLE.as_secs());
    // Each alone still works (and is extended as usual).
    for (login, user) in [(&alice, "alice"), (&bob, "bob")] {
        let r = get(h.addr, "/api/items", login).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(
            h.upstream.last_verified().identity.user.as_deref(),
            Some(user)
        );
        assert_eq!(expires_at(&h, login).await, T0 + 100 + IDLE.as_secs());
    }
}

#[tokio::test]
async fn a_live_session_beside_stale_garbage_or_ended_ones_is_used_in_either_order() {
    let h = Harness::start().await;
    let alice = h.login("alice", ALICE_PASSWORD).await;
    let ended = h.login("bob", BOB_PASSWORD).await;
    assert_eq!(logout(h.addr, &ended).await.status, StatusCode::NO_CONTENT);
    let unknown = unknown_id('B');
    let others = [
        "countersign_session=garbage".to_owned(),
        "countersign_session=".to_owned(),
        // Canonical length, not canonical form (trailing bits set).
        format!("{NAME}={}B", "A".repeat(42)),
        unknown,
        ended.cookie.clone(),
    ];
    let mut advanced = 0;
    for other in &others {
        for fields in [
            vec![format!("{other}; {}", alice.cookie)],
            vec![format!("{}; {other}", alice.cookie)],
            vec![other.clone(), alice.cookie.clone()],
            vec![
                format!("a=1; {other}; b=2"),
                format!("{}; c=3", alice.cookie),
            ],
        ] {
            h.clock.advance(1);
            advanced += 1;
            let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
            let r = get_with_cookies(&h, "/api/whoami", &fields).await;
            assert_eq!(r.status, StatusCode::OK, "{fields:?}: {}", r.text());
            assert_eq!(
                h.upstream.last_verified().identity.user.as_deref(),
                Some("alice"),
                "{fields:?}"
            );
            let s = get_with_cookies(&h, "/auth/session", &fields).await;
            assert_eq!(s.status, StatusCode::OK, "{fields:?}: {}", s.text());
            assert_eq!(s.json()["user"], "alice");
            assert_eq!(s.json()["csrf_token"], alice.csrf.as_str());
            // The session used is extended as usual.
            assert_eq!(expires_at(&h, &alice).await, T0 + advanced + IDLE.as_secs());
        }
    }
    // A state-changing request with the live session's token passes too.
    let r = send(
        h.addr,
        Method::POST,
        "/api/items",
        &[
            ("cookie", &format!("{}; {}", ended.cookie, alice.cookie)),
            ("x-csrf-token", &alice.csrf),
            ("origin", ORIGIN),
            ("content-type", "application/json"),
        ],
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        h.upstream.last_verified().identity.user.as_deref(),
        Some("alice")
    );
    // No live session at all: unauthenticated, as with one stale cookie.
    let none = format!("{}; {}", ended.cookie, unknown_id('C'));
    let r = get_with_cookies(&h, "/api/whoami", &[&none]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.error_code(), "unauthenticated");
}

#[tokio::test]
async fn the_same_id_twice_counts_once() {
    let h = Harness::start().await;
    let alice = h.login("alice", ALICE_PASSWORD).await;
    let twice = format!("{0}; {0}", alice.cookie);
    let spaced = format!("{0};  theme=x ;{0} ", alice.cookie);
    for fields in [
        vec![twice.as_str()],
        vec![spaced.as_str()],
        vec![alice.cookie.as_str(), alice.cookie.as_str()],
    ] {
        let r = get_with_cookies(&h, "/api/items", &fields).await;
        assert_eq!(r.status, StatusCode::OK, "{fields:?}: {}", r.text());
        assert_eq!(
            h.upstream.last_verified().identity.user.as_deref(),
            Some("alice")
        );
    }
}

#[tokio::test]
async fn more_candidates_than_the_cap_are_refused() {
    let h = Harness::start().await;
    let alice = h.login("alice", ALICE_PASSWORD).await;
    h.clock.advance(50);
    let fills = ['B', 'C', 'D', 'E', 'F', 'G'];
    // Up to the cap (the live one included): the live one is used.
    let mut at_cap = vec![alice.cookie.clone()];
    at_cap.extend(fills[..CAP - 1].iter().map(|&c| unknown_id(c)));
    let at_cap = at_cap.join("; ");
    let r = get_with_cookies(&h, "/api/items", &[&at_cap]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    // Non-canonical values do not count.
    let junk = format!("{at_cap}; {NAME}=x; {NAME}=y; {NAME}=z; {NAME}=w");
    let r = get_with_cookies(&h, "/api/items", &[&junk]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let touched = T0 + 50 + IDLE.as_secs();
    assert_eq!(expires_at(&h, &alice).await, touched);

    // One more distinct id: refused, whatever the order, and the live session not touched.
    h.clock.advance(50);
    let mut over = vec![alice.cookie.clone()];
    over.extend(fills[..CAP].iter().map(|&c| unknown_id(c)));
    let first = over.join("; ");
    over.reverse();
    let last = over.join("; ");
    for fields in [vec![first.as_str()], vec![last.as_str()]] {
        let r = get_with_cookies(&h, "/api/items", &fields).await;
        assert_ambiguous(&r);
    }
    assert_eq!(expires_at(&h, &alice).await, touched);
    // Login with that many: refused before the password is checked; the session stays.
    let r = login_alice_with_cookie(&h, &first).await;
    assert_ambiguous(&r);
    assert_eq!(expires_at(&h, &alice).await, touched);
}

#[tokio::test]
async fn logout_ends_only_the_session_its_csrf_token_names() {
    let h = Harness::start().await;
    let alice = h.login("alice", ALICE_PASSWORD).await;
    let bob = h.login("bob", BOB_PASSWORD).await;
    let logout_with = |cookie: String, token: String| {
        let addr = h.addr;
        async move {
            send(
                addr,
                Method::POST,
                "/auth/logout",
                &[
                    ("cookie", &cookie),
                    ("x-csrf-token", &token),
                    ("origin", ORIGIN),
                ],
                Bytes::new(),
            )
            .await
        }
    };
    let bob_first = format!("{}; {}", bob.cookie, alice.cookie);
    // A token of neither: refused as a CSRF failure, nothing ended.
    let r = logout_with(bob_first.clone(), "x".repeat(43)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
    assert_eq!(r.error_code(), "csrf");
    assert!(r.set_cookie().is_none());
    assert_eq!(
        get(h.addr, "/auth/session", &alice).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(h.addr, "/auth/session", &bob).await.status,
        StatusCode::OK
    );
    // Alice's token, her cookie second: her session ends, bob's does not.
    let r = logout_with(bob_first.clone(), alice.csrf.clone()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert!(r.set_cookie().unwrap().starts_with("countersign_session=;"));
    let gone = get(h.addr, "/auth/session", &alice).await;
    assert_eq!(gone.status, StatusCode::UNAUTHORIZED);
    assert_eq!(gone.error_code(), "unauthenticated");
    assert_eq!(
        get(h.addr, "/auth/session", &bob).await.status,
        StatusCode::OK
    );
    // Now only bob's is live among the two: a plain logout of bob works.
    let r = logout_with(bob_first, bob.csrf.clone()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert_eq!(
        get(h.addr, "/auth/session", &bob).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn login_ends_every_session_the_cookies_name() {
    let h = Harness::start().await;
    let alice = h.login("alice", ALICE_PASSWORD).await;
    let bob = h.login("bob", BOB_PASSWORD).await;
    // A browser holding both (bob's tossed in by a sibling) logs in as alice again.
    let r = login_alice_with_cookie(&h, &format!("{}; {}", alice.cookie, bob.cookie)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let fresh = r.login();
    for old in [&alice, &bob] {
        let s = get(h.addr, "/auth/session", old).await;
        assert_eq!(s.status, StatusCode::UNAUTHORIZED, "{}", old.cookie);
    }
    // The browser still sends bob's (ended) cookie beside the fresh one: the fresh one is used.
    let both = format!("{}; {}", bob.cookie, fresh.cookie);
    let r = get_with_cookies(&h, "/api/items", &[&both]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        h.upstream.last_verified().identity.user.as_deref(),
        Some("alice")
    );
}

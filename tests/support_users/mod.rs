//! Users files for tests of what happens to sessions when the users file changes: five users
//! with passwords and roles, their file's text, logins, and the checks that a session is
//! accepted (the API sees the request with the user's identity) or refused (401
//! `unauthenticated`, the API sees nothing). Include after `mod support;`.
#![allow(dead_code)]

use std::net::SocketAddr;

use http::{Method, StatusCode};

use crate::support::*;

/// The users of a test: each name with its password, its password's hash (made once, so that
/// writing the file again leaves the hash unchanged) and its roles.
#[derive(Clone)]
pub struct Users(pub Vec<User>);

#[derive(Clone)]
pub struct User {
    pub name: String,
    pub password: String,
    pub hash: String,
    pub roles: Vec<String>,
}

impl Users {
    /// alice (admin, ops), bob, carol (ops), dave (ops) and erin (a, b); each password is
    /// `<name>-pw`.
    pub fn five() -> Users {
        let user = |name: &str, roles: &[&str]| {
            let password = format!("{name}-pw");
            User {
                name: name.to_owned(),
                hash: cheap_hash(&password),
                password,
                roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            }
        };
        Users(vec![
            user("alice", &["admin", "ops"]),
            user("bob", &[]),
            user("carol", &["ops"]),
            user("dave", &["ops"]),
            user("erin", &["a", "b"]),
        ])
    }

    pub fn text(&self) -> String {
        self.0
            .iter()
            .map(|u| {
                format!(
                    "[[users]]\nname = \"{}\"\npassword = \"{}\"\nroles = {:?}\n",
                    u.name, u.hash, u.roles
                )
            })
            .collect()
    }

    pub fn remove(&mut self, name: &str) {
        self.0.retain(|u| u.name != name);
    }

    pub fn entry(&mut self, name: &str) -> &mut User {
        self.0.iter_mut().find(|u| u.name == name).unwrap()
    }

    pub fn password(&self, name: &str) -> String {
        self.0
            .iter()
            .find(|u| u.name == name)
            .unwrap()
            .password
            .clone()
    }

    /// A new password for `name` (its hash changes).
    pub fn reset_password(&mut self, name: &str) {
        let user = self.entry(name);
        user.password = format!("{name}-new-pw");
        user.hash = cheap_hash(&user.password);
    }

    pub fn set_roles(&mut self, name: &str, roles: &[&str]) {
        self.entry(name).roles = roles.iter().map(|r| (*r).to_owned()).collect();
    }
}

pub async fn login(addr: SocketAddr, users: &Users, user: &str) -> Login {
    login_from(addr, users, user, None).await
}

/// Logs `user` in, from a browser holding the session `previous` when given.
pub async fn login_from(
    addr: SocketAddr,
    users: &Users,
    user: &str,
    previous: Option<&Login>,
) -> Login {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(previous) = previous {
        headers.push(("cookie", previous.cookie.as_str()));
    }
    let r = send(
        addr,
        Method::POST,
        "/auth/login",
        &headers,
        serde_json::json!({ "username": user, "password": users.password(user) }).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "login {user}: {}", r.text());
    Login {
        cookie: r.session_cookie().unwrap(),
        csrf: r.json()["csrf_token"].as_str().unwrap().to_owned(),
    }
}

/// `session` works at `addr`: the API gets the request with `user`'s identity and `roles`.
pub async fn assert_accepted(
    addr: SocketAddr,
    upstream: &Upstream,
    session: &Login,
    user: &str,
    roles: &[&str],
) {
    let seen_before = upstream.raw_count();
    let r = get(addr, "/api/x", session).await;
    assert_eq!(r.status, StatusCode::OK, "{user}: {}", r.text());
    assert_eq!(r.json()["user"], user);
    assert_eq!(r.json()["roles"], serde_json::json!(roles), "{user}");
    assert_eq!(upstream.raw_count(), seen_before + 1, "{user}");
    let r = get(addr, "/auth/session", session).await;
    assert_eq!(r.status, StatusCode::OK, "{user}: {}", r.text());
    assert_eq!(r.json()["user"], user);
}

/// `session` gets what a request without a live session gets, on the proxied path (reads and
/// writes) and on `/auth/session` and `/auth/logout`, and the API never sees a request.
pub async fn assert_refused(addr: SocketAddr, upstream: &Upstream, session: &Login, who: &str) {
    let seen_before = upstream.raw_count();
    let read = get(addr, "/api/x", session).await;
    let write = post_json(addr, "/api/x", session, "{}").await;
    let current = get(addr, "/auth/session", session).await;
    let logout = logout(addr, session).await;
    for (what, r) in [
        ("GET /api/x", &read),
        ("POST /api/x", &write),
        ("GET /auth/session", &current),
        ("POST /auth/logout", &logout),
    ] {
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{who}: {what}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), "unauthenticated", "{who}: {what}");
    }
    assert_eq!(
        upstream.raw_count(),
        seen_before,
        "{who}: the API saw a request"
    );
}

/// Sessions from before the users file changed, at the proxy `addr` on the changed file: bob
/// (removed) and dave (other roles) are refused, alice (unchanged) and erin (the same roles in
/// another order) accepted.
pub async fn assert_changed_refused_unchanged_accepted(
    addr: SocketAddr,
    upstream: &Upstream,
    sessions: &[(&str, Login)],
) {
    let session = |name: &str| &sessions.iter().find(|(n, _)| *n == name).unwrap().1;
    assert_refused(addr, upstream, session("bob"), "bob (removed)").await;
    assert_refused(addr, upstream, session("dave"), "dave (roles)").await;
    assert_accepted(addr, upstream, session("alice"), "alice", &["admin", "ops"]).await;
    assert_accepted(addr, upstream, session("erin"), "erin", &["a", "b"]).await;
}

//! Adversarial checks of how the proxy reads the client's address from a trusted balancer's
//! `X-Forwarded-For` (src/proxy/client_address.rs), against the real `countersign run` and a
//! real upstream behind the `VerifyLayer`: a balancer that joins the field lines it received
//! into one (nginx's `$proxy_add_x_forwarded_for`) puts whatever bytes a browser wrote to the
//! left of its own element in the same line; those bytes must not cost the balancer's element.
//! Run: `cargo test --all-features --test proxy_client_address_qa`.
#![cfg(feature = "proxy")]

mod support;
mod support_run;
mod support_trusted;
mod support_users;

use support_trusted::{lo, raw_from, seen_since, start, who};
use support_users::*;

fn login_request(user: &str, password: &str, extra: &[u8]) -> Vec<u8> {
    let body = serde_json::json!({ "username": user, "password": password }).to_string();
    [
        format!(
            "POST /auth/login HTTP/1.1\r\nHost: app.test\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n",
            body.len()
        )
        .as_bytes(),
        extra,
        b"\r\n",
        body.as_bytes(),
    ]
    .concat()
}

/// The browser wrote `\xc3\xa9…` (bytes that are not visible ASCII, which HTTP/1.1 allows as
/// obs-text) into its own `X-Forwarded-For`; the balancer at 127.0.0.1 appended the browser's
/// address in the same line. The client is that address: for the API's `X-Forwarded-For`,
/// and for the login throttle, whose count for the balancer's own address (every browser
/// whose header names nobody) the browser must not be able to spend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_a_browser_wrote_left_of_the_balancers_element_do_not_make_it_the_balancer() {
    let qa = start(
        "client-address-qa-obs-text",
        "trusted_proxies = [\"127.0.0.1\", \"10.0.0.0/8\"]\n",
        None,
    )
    .await;
    let session = login(qa.addr, &qa.users, "alice").await;
    let joined: &[u8] = b"X-Forwarded-For: \xc3\xa9198.51.100.66, 203.0.113.7\r\n";
    let with_hop: &[u8] = b"X-Forwarded-For: 198.51.100.66\xff, 203.0.113.8, 10.0.0.5\r\n";
    for (extra, expected) in [(joined, "203.0.113.7"), (with_hop, "203.0.113.8")] {
        let before = qa.upstream.raw_count();
        let out = raw_from(lo(1), qa.addr, &who(&session, extra, true)).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(
            seen_since(&qa.upstream, before),
            [vec![expected.to_owned()]],
            "{}",
            String::from_utf8_lossy(extra)
        );
    }
    // Three failed logins with that header count against 203.0.113.7 (max_failures_per_ip =
    // 3), not against the balancer: its own login (no header) still goes through, and the
    // browser's fourth is throttled.
    for user in ["alice", "bob", "carol"] {
        let out = raw_from(lo(1), qa.addr, &login_request(user, "wrong", joined)).await;
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    }
    let bob = qa.users.password("bob");
    let out = raw_from(lo(1), qa.addr, &login_request("bob", &bob, b"")).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let out = raw_from(lo(1), qa.addr, &login_request("bob", &bob, joined)).await;
    assert!(out.starts_with("HTTP/1.1 429"), "{out}");
}

//! The SPA served same-origin: content types, ETag/304, client-route fallback, traversal.
//! Run: `cargo test --all-features --test proxy_static`.
#![cfg(feature = "proxy")]

mod support;

use bytes::Bytes;
use countersign::proxy::static_files::{Site, StaticDir};
use http::{Method, StatusCode};
use support::*;

struct Spa {
    h: Harness,
    root: std::path::PathBuf,
}

async fn spa() -> Spa {
    let base = temp_dir("static");
    let root = base.join("dist");
    write(
        &root.join("index.html"),
        "<!doctype html><title>spa</title>",
    );
    write(&root.join("app.js"), "console.log('app')");
    write(&root.join("style.css"), "body{}");
    write(
        &root.join("assets/logo.svg"),
        "<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
    );
    write(&root.join("assets/data.bin"), "\u{1}\u{2}");
    write(&root.join("docs/index.html"), "docs index");
    write(&root.join(".env"), "SECRET=1");
    write(&base.join("secret.txt"), "outside the root");
    std::os::unix::fs::symlink(base.join("secret.txt"), root.join("escape.txt")).unwrap();
    let site = Site::Dir(StaticDir::new(&root).unwrap());
    let h = Harness::start_with(HarnessOptions {
        site: Some(site),
        ..HarnessOptions::default()
    })
    .await;
    Spa { h, root }
}

async fn fetch(h: &Harness, path: &str) -> Reply {
    send(h.addr, Method::GET, path, &[], Bytes::new()).await
}

#[tokio::test]
async fn files_have_the_right_content_types() {
    let Spa { h, .. } = spa().await;
    for (path, ty, body) in [
        (
            "/",
            "text/html; charset=utf-8",
            "<!doctype html><title>spa</title>",
        ),
        (
            "/index.html",
            "text/html; charset=utf-8",
            "<!doctype html><title>spa</title>",
        ),
        (
            "/app.js",
            "text/javascript; charset=utf-8",
            "console.log('app')",
        ),
        ("/style.css", "text/css; charset=utf-8", "body{}"),
        (
            "/assets/logo.svg",
            "image/svg+xml; charset=utf-8",
            "<svg xmlns=\"http://www.w3.org/2000/svg\"/>",
        ),
        ("/assets/data.bin", "application/octet-stream", "\u{1}\u{2}"),
        ("/docs/", "text/html; charset=utf-8", "docs index"),
    ] {
        let r = fetch(&h, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.headers["content-type"], ty, "{path}");
        assert_eq!(r.text(), body, "{path}");
        assert_eq!(r.headers["x-content-type-options"], "nosniff");
    }
    let head = send(h.addr, Method::HEAD, "/app.js", &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.headers["content-length"], "18");
    let post = send(h.addr, Method::POST, "/app.js", &[], Bytes::new()).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn etag_and_conditional_get() {
    let Spa { h, root } = spa().await;
    let r = fetch(&h, "/app.js").await;
    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let again = send(
        h.addr,
        Method::GET,
        "/app.js",
        &[("if-none-match", &etag)],
        Bytes::new(),
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    assert!(again.body.is_empty());
    assert_eq!(again.headers["etag"], etag.as_str());
    let weak = format!("\"other\", W/{etag}");
    let again = send(
        h.addr,
        Method::GET,
        "/app.js",
        &[("if-none-match", &weak)],
        Bytes::new(),
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    let stale = send(
        h.addr,
        Method::GET,
        "/app.js",
        &[("if-none-match", "\"stale\"")],
        Bytes::new(),
    )
    .await;
    assert_eq!(stale.status, StatusCode::OK);
    // A new deploy changes the tag.
    write(&root.join("app.js"), "console.log('v2')");
    let changed = send(
        h.addr,
        Method::GET,
        "/app.js",
        &[("if-none-match", &etag)],
        Bytes::new(),
    )
    .await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_ne!(changed.headers["etag"], etag.as_str());
}

#[tokio::test]
async fn client_routes_fall_back_to_index_html() {
    let Spa { h, .. } = spa().await;
    for path in ["/notes", "/notes/42/edit", "/settings?tab=1"] {
        let r = fetch(&h, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.text(), "<!doctype html><title>spa</title>", "{path}");
    }
    // A missing asset (it has an extension) is a real 404, not the app shell.
    let r = fetch(&h, "/missing.js").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "not_found");
    // Upstream routes and auth endpoints are not shadowed by the fallback.
    assert_eq!(fetch(&h, "/api/x").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        fetch(&h, "/auth/session").await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn path_traversal_is_refused() {
    let Spa { h, .. } = spa().await;
    for target in [
        "/../secret.txt",
        "/assets/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E/secret.txt",
        "/assets/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/..%2fsecret.txt",
        "/assets%2f..%2f..%2fsecret.txt",
        "/..%5csecret.txt",
        "/%00index.html",
        "/./index.html",
    ] {
        // Raw request line, so no client library normalises the path first.
        let request = format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let answer = raw_exchange(h.addr, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        assert!(!answer.contains("outside the root"), "{target}");
    }
    // Hidden files and symlinks leading out of the root are not served either.
    for path in ["/.env", "/escape.txt"] {
        let r = fetch(&h, path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert!(
            !r.text().contains("SECRET") && !r.text().contains("outside"),
            "{path}"
        );
    }
}

/// Files are kept in memory once read (every download shares that copy), a changed file is
/// served changed at once, and the cache stays within its budget.
#[tokio::test]
async fn file_contents_are_cached_within_the_budget_and_changes_are_seen() {
    let root = temp_dir("static-cache").join("dist");
    write(&root.join("index.html"), "<!doctype html>");
    write(&root.join("a.js"), &"a".repeat(600));
    write(&root.join("b.js"), &"b".repeat(600));
    let dir = StaticDir::new(&root).unwrap().max_cache_bytes(1000);
    let h = Harness::start_with(HarnessOptions {
        site: Some(Site::Dir(dir.clone())),
        ..HarnessOptions::default()
    })
    .await;
    assert_eq!(fetch(&h, "/a.js").await.text(), "a".repeat(600));
    assert_eq!(dir.cached_bytes(), 600);
    // Again: served from memory, nothing more held.
    let again = fetch(&h, "/a.js").await;
    assert_eq!(again.text(), "a".repeat(600));
    assert_eq!(dir.cached_bytes(), 600);
    // A second file does not fit beside the first: the first is dropped, within the budget.
    assert_eq!(fetch(&h, "/b.js").await.text(), "b".repeat(600));
    assert_eq!(dir.cached_bytes(), 600);
    // A changed file (another size; then the same size, later) is read again, not served
    // stale, and its ETag changes with it.
    let etag = again.headers["etag"].clone();
    write(&root.join("a.js"), "changed");
    let changed = fetch(&h, "/a.js").await;
    assert_eq!(changed.text(), "changed");
    assert_ne!(changed.headers["etag"], etag);
    std::thread::sleep(std::time::Duration::from_millis(20));
    write(&root.join("a.js"), "CHANGED");
    assert_eq!(fetch(&h, "/a.js").await.text(), "CHANGED");
    // A file larger than the whole budget is served, not kept.
    write(&root.join("big.js"), &"x".repeat(1500));
    assert_eq!(fetch(&h, "/big.js").await.text().len(), 1500);
    assert!(dir.cached_bytes() <= 1000, "{}", dir.cached_bytes());
    // No cache at all.
    let none = StaticDir::new(&root).unwrap().max_cache_bytes(0);
    let h = Harness::start_with(HarnessOptions {
        site: Some(Site::Dir(none.clone())),
        ..HarnessOptions::default()
    })
    .await;
    assert_eq!(fetch(&h, "/a.js").await.text(), "CHANGED");
    assert_eq!(none.cached_bytes(), 0);
}

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
    let h = start_static(base, &root).await;
    Spa { h, root }
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
    // The content's hash is the only validator (the same on every proxy of a fleet); a
    // modification time is not offered, and a date to compare with is no reason for a 304.
    assert!(r.headers.get("last-modified").is_none());
    let dated = send(
        h.addr,
        Method::GET,
        "/app.js",
        &[("if-modified-since", "Fri, 01 Jan 2100 00:00:00 GMT")],
        Bytes::new(),
    )
    .await;
    assert_eq!(dated.status, StatusCode::OK);
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
    let base = temp_dir("static-cache");
    let root = base.join("dist");
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

/// The plain `app.js` and its precompressed siblings, as a build with
/// vite-plugin-compression (or `brotli`/`gzip` in CI) leaves them.
const APP_JS: &str = "console.log('app, precompressed')";
/// Stand-ins for Brotli output (no Brotli encoder here): the tests check which file is sent.
const APP_JS_BR: &str = "BR:app.js";
const INDEX_BR: &str = "BR:index.html";

struct Precompressed {
    h: Harness,
    root: std::path::PathBuf,
    /// `app.js.gz` as written: real gzip output when the `gzip` command exists.
    app_gz: Vec<u8>,
    real_gzip: bool,
}

/// `gzip -c -n`, when the system has the command.
fn system_gzip(input: &[u8]) -> Option<Vec<u8>> {
    run_filter(&["-c", "-n"], input)
}

fn system_gunzip(input: &[u8]) -> Option<Vec<u8>> {
    run_filter(&["-d", "-c"], input)
}

fn run_filter(args: &[&str], input: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new("gzip")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(input).ok()?;
    let out = child.wait_with_output().ok()?;
    out.status.success().then_some(out.stdout)
}

async fn precompressed() -> Precompressed {
    let base = temp_dir("static-precompressed");
    let root = base.join("dist");
    write(
        &root.join("index.html"),
        "<!doctype html><title>spa</title>",
    );
    write(&root.join("index.html.br"), INDEX_BR);
    write(&root.join("app.js"), APP_JS);
    write(&root.join("app.js.br"), APP_JS_BR);
    let (app_gz, real_gzip) = match system_gzip(APP_JS.as_bytes()) {
        Some(gz) => (gz, true),
        None => (b"GZ:app.js".to_vec(), false),
    };
    std::fs::write(root.join("app.js.gz"), &app_gz).unwrap();
    // Only a gzip sibling.
    write(&root.join("style.css"), "body{}");
    write(&root.join("style.css.gz"), "GZ:style.css");
    // No sibling at all.
    write(&root.join("plain.js"), "plain");
    // A sibling that is a symlink: out of the root (never served), and within it (served).
    write(&base.join("secret.br"), "outside the root");
    write(&root.join("leak.js"), "leak plain");
    std::os::unix::fs::symlink(base.join("secret.br"), root.join("leak.js.br")).unwrap();
    write(&root.join("linked.js"), "linked plain");
    write(&root.join("compressed/linked.br"), "BR:linked.js");
    std::os::unix::fs::symlink(root.join("compressed/linked.br"), root.join("linked.js.br"))
        .unwrap();
    // A folder named like a sibling is no sibling.
    write(&root.join("dir.js"), "dir plain");
    write(&root.join("dir.js.br/inner"), "x");
    let h = Harness::start_with(HarnessOptions {
        site: Some(Site::Dir(StaticDir::new(&root).unwrap())),
        files: Some(base),
        ..HarnessOptions::default()
    })
    .await;
    Precompressed {
        h,
        root,
        app_gz,
        real_gzip,
    }
}

async fn fetch_encoded(h: &Harness, method: Method, path: &str, accept: Option<&str>) -> Reply {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("accept-encoding", a)).into_iter().collect();
    send(h.addr, method, path, &headers, Bytes::new()).await
}

fn content_encoding(r: &Reply) -> Option<&str> {
    r.headers
        .get("content-encoding")
        .map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn precompressed_siblings_follow_accept_encoding() {
    let Precompressed {
        h,
        app_gz,
        real_gzip,
        ..
    } = precompressed().await;
    let js = "text/javascript; charset=utf-8";
    for (accept, encoding, body) in [
        // Br preferred when both are acceptable (what browsers send).
        (
            Some("gzip, deflate, br, zstd"),
            Some("br"),
            APP_JS_BR.as_bytes(),
        ),
        (Some("*"), Some("br"), APP_JS_BR.as_bytes()),
        // The client's weights decide; br not acceptable: gzip.
        (Some("gzip;q=1, br;q=0.5"), Some("gzip"), &app_gz[..]),
        (Some("gzip, deflate"), Some("gzip"), &app_gz[..]),
        (Some("br;q=0, gzip"), Some("gzip"), &app_gz[..]),
        (Some("BR;Q=0, *"), Some("gzip"), &app_gz[..]),
        // Neither: the plain file.
        (None, None, APP_JS.as_bytes()),
        (Some(""), None, APP_JS.as_bytes()),
        (Some("identity"), None, APP_JS.as_bytes()),
        (Some("br;q=0, gzip;q=0"), None, APP_JS.as_bytes()),
        (Some("*;q=0"), None, APP_JS.as_bytes()),
        (Some("deflate, zstd"), None, APP_JS.as_bytes()),
    ] {
        let r = fetch_encoded(&h, Method::GET, "/app.js", accept).await;
        assert_eq!(r.status, StatusCode::OK, "{accept:?}");
        assert_eq!(content_encoding(&r), encoding, "{accept:?}");
        assert_eq!(&r.body[..], body, "{accept:?}");
        // The original's type, and Vary on every representation.
        assert_eq!(r.headers["content-type"], js, "{accept:?}");
        assert_eq!(r.headers["vary"], "accept-encoding", "{accept:?}");
        assert_eq!(r.headers["content-length"], body.len().to_string().as_str());
    }
    // The gzip representation decodes to the plain file.
    if real_gzip {
        let r = fetch_encoded(&h, Method::GET, "/app.js", Some("gzip")).await;
        assert_eq!(content_encoding(&r), Some("gzip"));
        assert_eq!(system_gunzip(&r.body).unwrap(), APP_JS.as_bytes());
    }
    // Only a gzip sibling: gzip even when br is preferred.
    let r = fetch_encoded(&h, Method::GET, "/style.css", Some("br, gzip")).await;
    assert_eq!(content_encoding(&r), Some("gzip"));
    assert_eq!(r.text(), "GZ:style.css");
    assert_eq!(r.headers["content-type"], "text/css; charset=utf-8");
    let r = fetch_encoded(&h, Method::GET, "/style.css", Some("br")).await;
    assert_eq!(content_encoding(&r), None);
    assert_eq!(r.text(), "body{}");
    // No sibling: the plain file, still with Vary.
    let r = fetch_encoded(&h, Method::GET, "/plain.js", Some("br, gzip")).await;
    assert_eq!(content_encoding(&r), None);
    assert_eq!(r.text(), "plain");
    assert_eq!(r.headers["vary"], "accept-encoding");
    // A folder named like a sibling is not one.
    let r = fetch_encoded(&h, Method::GET, "/dir.js", Some("br")).await;
    assert_eq!(content_encoding(&r), None);
    assert_eq!(r.text(), "dir plain");
}

#[tokio::test]
async fn precompressed_representations_have_their_own_etags_and_answer_head() {
    let Precompressed { h, root, .. } = precompressed().await;
    let mut etags = Vec::new();
    for accept in [None, Some("br"), Some("gzip")] {
        let r = fetch_encoded(&h, Method::GET, "/app.js", accept).await;
        let etag = r.headers["etag"].to_str().unwrap().to_owned();
        // Its own tag answers 304 for this representation, with Vary and no body...
        let mut headers = vec![("if-none-match", etag.as_str())];
        headers.extend(accept.map(|a| ("accept-encoding", a)));
        let again = send(h.addr, Method::GET, "/app.js", &headers, Bytes::new()).await;
        assert_eq!(again.status, StatusCode::NOT_MODIFIED, "{accept:?}");
        assert!(again.body.is_empty());
        assert_eq!(again.headers["etag"], etag.as_str());
        assert_eq!(again.headers["vary"], "accept-encoding");
        etags.push(etag);
    }
    etags.dedup();
    assert_eq!(etags.len(), 3, "{etags:?}");
    // ...and another representation's tag does not: the bytes sent differ.
    let plain_tag = etags[0].as_str();
    let r = send(
        h.addr,
        Method::GET,
        "/app.js",
        &[("if-none-match", plain_tag), ("accept-encoding", "br")],
        Bytes::new(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(content_encoding(&r), Some("br"));
    assert_eq!(r.text(), APP_JS_BR);
    // Served alternately, each representation keeps its own cached bytes.
    for _ in 0..2 {
        assert_eq!(
            fetch_encoded(&h, Method::GET, "/app.js", None).await.text(),
            APP_JS
        );
        let br = fetch_encoded(&h, Method::GET, "/app.js", Some("br")).await;
        assert_eq!(br.text(), APP_JS_BR);
        assert_eq!(br.headers["etag"], etags[1].as_str());
    }
    // HEAD: the headers of the GET, the sibling's length, no body.
    let head = fetch_encoded(&h, Method::HEAD, "/app.js", Some("br, gzip")).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(content_encoding(&head), Some("br"));
    assert_eq!(
        head.headers["content-length"],
        APP_JS_BR.len().to_string().as_str()
    );
    assert_eq!(
        head.headers["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert_eq!(head.headers["etag"], etags[1].as_str());
    assert_eq!(head.headers["vary"], "accept-encoding");
    // A new sibling is served at once, with a new tag; a removed one falls back to gzip.
    write(&root.join("app.js.br"), "BR:app.js v2");
    let r = fetch_encoded(&h, Method::GET, "/app.js", Some("br, gzip")).await;
    assert_eq!(r.text(), "BR:app.js v2");
    assert_ne!(r.headers["etag"], etags[1].as_str());
    std::fs::remove_file(root.join("app.js.br")).unwrap();
    let r = fetch_encoded(&h, Method::GET, "/app.js", Some("br, gzip")).await;
    assert_eq!(content_encoding(&r), Some("gzip"));
    assert_eq!(r.headers["etag"], etags[2].as_str());
}

#[tokio::test]
async fn compressed_files_asked_for_by_name_are_served_as_they_are() {
    let Precompressed { h, app_gz, .. } = precompressed().await;
    let r = fetch_encoded(&h, Method::GET, "/app.js.br", Some("br, gzip")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(content_encoding(&r), None);
    assert_eq!(r.text(), APP_JS_BR);
    assert_ne!(r.headers["content-type"], "text/javascript; charset=utf-8");
    let r = fetch_encoded(&h, Method::GET, "/app.js.gz", Some("gzip")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(content_encoding(&r), None);
    assert_eq!(&r.body[..], &app_gz[..]);
    assert_ne!(r.headers["content-type"], "text/javascript; charset=utf-8");
}

#[tokio::test]
async fn precompressed_symlinks_out_of_the_root_are_not_served() {
    let Precompressed { h, .. } = precompressed().await;
    let r = fetch_encoded(&h, Method::GET, "/leak.js", Some("br")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(content_encoding(&r), None);
    assert_eq!(r.text(), "leak plain");
    assert!(!r.text().contains("outside"));
    // A symlink to a file under the root is followed like any other.
    let r = fetch_encoded(&h, Method::GET, "/linked.js", Some("br")).await;
    assert_eq!(content_encoding(&r), Some("br"));
    assert_eq!(r.text(), "BR:linked.js");
}

#[tokio::test]
async fn the_client_route_fallback_uses_the_compressed_index_html() {
    let Precompressed { h, .. } = precompressed().await;
    for path in ["/", "/index.html", "/notes/42/edit"] {
        let r = fetch_encoded(&h, Method::GET, path, Some("gzip, br")).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(content_encoding(&r), Some("br"), "{path}");
        assert_eq!(r.text(), INDEX_BR, "{path}");
        assert_eq!(r.headers["content-type"], "text/html; charset=utf-8");
        assert_eq!(r.headers["vary"], "accept-encoding");
        let plain = fetch_encoded(&h, Method::GET, path, None).await;
        assert_eq!(content_encoding(&plain), None, "{path}");
        assert_eq!(plain.text(), "<!doctype html><title>spa</title>", "{path}");
    }
}

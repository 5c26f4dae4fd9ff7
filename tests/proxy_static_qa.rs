//! An adversarial pass over the static file server (`server.static_dir`), against the real
//! in-process server on loopback. Each test says whether it is from a defect the pass found
//! (the test failed before the fix) or a guard for an attack that was already refused.
//! Run: `cargo test --all-features --test proxy_static_qa`.
#![cfg(feature = "proxy")]

mod support;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;

const INDEX: &str = "<!doctype html><title>spa</title>";
/// 26 bytes, so each byte of a range is easy to name.
const APP_JS: &str = "abcdefghijklmnopqrstuvwxyz";

struct Spa {
    h: Harness,
    root: std::path::PathBuf,
}

/// A build (`dist/`) beside files that must never be served: `secret.txt` next to it, and a
/// folder whose name starts with the root's (`dist-private/`), the classic string-prefix
/// containment mistake.
async fn spa() -> Spa {
    let base = temp_dir("static-qa");
    let root = base.join("dist");
    write(&root.join("index.html"), INDEX);
    write(&root.join("app.js"), APP_JS);
    write(&root.join("empty.txt"), "");
    write(&root.join("docs/index.html"), "docs index");
    write(&root.join("docs/guide.html"), "guide");
    write(&root.join("emptydir/.keep"), "");
    write(
        &root.join(".well-known/security.txt"),
        "Contact: mailto:security@example.com\n",
    );
    // A build that happens to hold a folder named like the API prefix (mock data).
    write(&root.join("api/mock.json"), "{\"mock\":true}");
    write(&root.join("auth/page.html"), "auth page");
    write(&root.join(".env"), "SECRET=env");
    write(&root.join(".git/config"), "SECRET=git");
    write(&root.join("assets/.env"), "SECRET=nested");
    write(&root.join(".well-known/.git/config"), "SECRET=wk");
    write(&base.join("secret.txt"), "SECRET=outside");
    write(&base.join("dist-private/secret.txt"), "SECRET=sibling");
    write(&base.join("dist-private/secret"), "SECRET=sibling-noext");
    let link = |target: std::path::PathBuf, name: &str| {
        std::os::unix::fs::symlink(target, root.join(name)).unwrap()
    };
    link(base.join("secret.txt"), "escape.txt");
    link(base.join("dist-private"), "private");
    link(base.join("dist-private/secret"), "noext-escape");
    let h = start_static(base, &root).await;
    Spa { h, root }
}

async fn fetch_with(h: &Harness, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(h.addr, Method::GET, path, headers, Bytes::new()).await
}

/// One raw request line (no client library normalises the target), the whole answer.
async fn raw_get(h: &Harness, target: &str) -> String {
    let request = format!("GET {target} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    raw_exchange(h.addr, request.as_bytes()).await
}

fn header<'a>(r: &'a Reply, name: &str) -> Option<&'a str> {
    r.headers.get(name).map(|v| v.to_str().unwrap())
}

// ---------------------------------------------------------------------------------------------
// Defects
// ---------------------------------------------------------------------------------------------

/// DEFECT. RFC 8615 well-known URIs are not client routes: a missing one must be a 404, never
/// the SPA's `index.html` with 200. Browsers' password managers probe
/// `/.well-known/change-password` and, to tell a server that answers 200 to everything, the
/// spec's `/.well-known/resource-that-should-not-exist-whose-status-code-should-not-be-200`
/// (W3C "A Well-Known URL for Changing Passwords"); iOS fetches
/// `apple-app-site-association` (no extension). (Before: 200 with `index.html` for each.)
#[tokio::test]
async fn missing_well_known_resources_are_404_not_the_app_shell() {
    let Spa { h, .. } = spa().await;
    for path in [
        "/.well-known/change-password",
        "/.well-known/resource-that-should-not-exist-whose-status-code-should-not-be-200",
        "/.well-known/apple-app-site-association",
        "/.well-known/acme-challenge/some-token",
        "/.well-known/openid-configuration",
    ] {
        let r = fetch(&h, path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}: {}", r.text());
        assert_ne!(r.text(), INDEX, "{path}");
        assert_eq!(r.error_code(), "not_found", "{path}");
    }
    // The files the build put there are still served.
    let r = fetch(&h, "/.well-known/security.txt").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "Contact: mailto:security@example.com\n");
    // A client route elsewhere still falls back.
    assert_eq!(fetch(&h, "/notes/42").await.text(), INDEX);
}

/// DEFECT. `/%61pi/users` is the same URI as `/api/users` (RFC 3986 §6.2.2.2: percent-encoded
/// unreserved characters are equivalent to the characters), and nginx routes both alike
/// (`location` matches the decoded path). The router matches the path as received, so these
/// spellings missed the `/api/` route and `/auth/`, and the static handler, which decodes,
/// answered an API or auth URL with the SPA shell (200 `text/html`), or with a file of the build
/// under a folder the route shadows (`dist/api/mock.json`). They must be 404 `not_found`: a
/// request meant for the API never gets `index.html`. (Before: 200 for each.)
#[tokio::test]
async fn encoded_spellings_of_routed_prefixes_never_reach_the_static_files() {
    let Spa { h, .. } = spa().await;
    for path in [
        "/%61pi/users",
        "/%61%70%69/users/7",
        "/%61pi",
        "/ap%69/mock.json",
        "/%61uth/session",
        "/%61uth/page.html",
        "/auth%2Fsession",
        // `;` parameters, which a Tomcat or Jetty drops: `/api/users` there.
        "/api;x/users",
        "/ap%69;v=1/mock.json",
    ] {
        let r = fetch(&h, path).await;
        assert_ne!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert!(
            r.status == StatusCode::NOT_FOUND || r.status == StatusCode::BAD_REQUEST,
            "{path}: {}",
            r.status
        );
        assert_ne!(r.text(), INDEX, "{path}");
        assert!(!r.text().contains("mock"), "{path}");
        // Nothing was sent to the API either.
        assert_eq!(h.upstream.raw_count(), 0, "{path}");
    }
    // The plain spellings go where they always went: the API (401 without a session), the
    // proxy's own endpoints.
    assert_eq!(
        fetch(&h, "/api/users").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        fetch(&h, "/auth/session").await.status,
        StatusCode::UNAUTHORIZED
    );
    // Percent-encoding elsewhere in a static path still works (a file name with a space).
    write(&h_root(&h).join("a b.txt"), "spaced");
    assert_eq!(fetch(&h, "/a%20b.txt").await.text(), "spaced");
    assert_eq!(fetch(&h, "/%61pp.js").await.text(), APP_JS);
    // A client route whose decoded spelling routes nowhere still falls back.
    assert_eq!(fetch(&h, "/%6eotes/1").await.text(), INDEX);
}

fn h_root(h: &Harness) -> std::path::PathBuf {
    h.files.as_ref().unwrap().join("dist")
}

/// DEFECT. A folder asked for without its trailing slash (`/docs`) was answered with its
/// `index.html` at that URL, so the page's relative references resolved against `/`:
/// `<link href="style.css">` in `docs/index.html` loaded `/style.css`, not `/docs/style.css`
/// (a Storybook, MkDocs or Docusaurus build under a folder of the SPA rendered without its
/// assets). nginx and Express's `serve-static` answer 301 to `/docs/`; so does the proxy now,
/// keeping the query. A folder without an `index.html` is still a client route.
#[tokio::test]
async fn a_folder_without_its_trailing_slash_is_redirected_to_it() {
    let Spa { h, .. } = spa().await;
    for (target, location) in [
        ("/docs", "/docs/"),
        ("/docs?x=1&y=%2F", "/docs/?x=1&y=%2F"),
        ("/d%6fcs", "/d%6fcs/"),
    ] {
        let r = fetch(&h, target).await;
        assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY, "{target}");
        assert_eq!(header(&r, "location"), Some(location), "{target}");
        assert!(r.body.is_empty(), "{target}");
        assert_eq!(header(&r, "x-content-type-options"), Some("nosniff"));
        let head = send(h.addr, Method::HEAD, target, &[], Bytes::new()).await;
        assert_eq!(head.status, StatusCode::MOVED_PERMANENTLY, "HEAD {target}");
    }
    let r = fetch(&h, "/docs/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "docs index");
    // The site root is never redirected; a folder without index.html is a client route.
    assert_eq!(fetch(&h, "/").await.text(), INDEX);
    let r = fetch(&h, "/emptydir").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), INDEX);
    // Files are served at their own URL.
    assert_eq!(fetch(&h, "/docs/guide.html").await.text(), "guide");
}

/// DEFECT. Byte ranges (RFC 9110 §14). The files were always sent whole, without
/// `Accept-Ranges`: Safari and iOS play `<video>`/`<audio>` only from a server that answers
/// `Range` with 206 (an SPA's intro video did not play there), and an interrupted download
/// could not resume. One range is now served from the bytes in memory; a set of several is
/// answered with the whole file (allowed by §14.2, as many servers do); an unsatisfiable one
/// is 416 with `Content-Range: bytes */len`; malformed ones are ignored.
#[tokio::test]
async fn single_byte_ranges_are_served_with_206() {
    let Spa { h, .. } = spa().await;
    let full = fetch(&h, "/app.js").await;
    assert_eq!(header(&full, "accept-ranges"), Some("bytes"));
    let etag = header(&full, "etag").unwrap().to_owned();
    for (range, body, content_range) in [
        ("bytes=0-3", "abcd", "bytes 0-3/26"),
        ("bytes=3-3", "d", "bytes 3-3/26"),
        ("bytes=20-", "uvwxyz", "bytes 20-25/26"),
        ("bytes=-3", "xyz", "bytes 23-25/26"),
        // Past the end: cut at the end.
        ("bytes=24-1000", "yz", "bytes 24-25/26"),
        ("bytes=-1000", APP_JS, "bytes 0-25/26"),
        // A last position too large for any integer is still "past the end".
        ("bytes=25-99999999999999999999999999", "z", "bytes 25-25/26"),
        ("bytes=-99999999999999999999999999", APP_JS, "bytes 0-25/26"),
        // The unit is case-insensitive, whitespace around the spec is allowed.
        ("Bytes= 1-2 ", "bc", "bytes 1-2/26"),
    ] {
        let r = fetch_with(&h, "/app.js", &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(r.text(), body, "{range}");
        assert_eq!(header(&r, "content-range"), Some(content_range), "{range}");
        assert_eq!(
            header(&r, "content-length"),
            Some(body.len().to_string().as_str()),
            "{range}"
        );
        assert_eq!(header(&r, "etag"), Some(etag.as_str()), "{range}");
        assert_eq!(
            header(&r, "content-type"),
            Some("text/javascript; charset=utf-8")
        );
        assert_eq!(header(&r, "x-content-type-options"), Some("nosniff"));
    }
    // Not satisfiable: 416 with the current length and the reason code, none of the file.
    for range in [
        "bytes=26-",
        "bytes=26-30",
        "bytes=-0",
        "bytes=99999999999999999999999999-",
    ] {
        let r = fetch_with(&h, "/app.js", &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(header(&r, "content-range"), Some("bytes */26"), "{range}");
        assert_eq!(r.text(), r#"{"error":"range_not_satisfiable"}"#, "{range}");
        assert_eq!(header(&r, "content-type"), Some("application/json"));
        assert_eq!(header(&r, "accept-ranges"), Some("bytes"));
        assert_eq!(header(&r, "x-content-type-options"), Some("nosniff"));
    }
    // An empty file has no satisfiable range.
    let r = fetch_with(&h, "/empty.txt", &[("range", "bytes=0-")]).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(header(&r, "content-range"), Some("bytes */0"));
    assert_eq!(r.text(), r#"{"error":"range_not_satisfiable"}"#);
    // Counted under their code, as every refusal of the proxy's (4 + 1 so far).
    assert_eq!(refusals(&h, "range_not_satisfiable").await, 5);
    // Malformed or several ranges, another unit: the whole file, 200.
    for range in [
        "bytes=5-1",
        "bytes=0-1,3-4",
        "bytes=0-1, 20-",
        "bytes=",
        "bytes=-",
        "bytes=a-b",
        "bytes=+1-2",
        "bytes=1-+2",
        "bytes=0x1-2",
        "bytes 0-1",
        "items=0-1",
        "bytes=1--2",
    ] {
        let r = fetch_with(&h, "/app.js", &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::OK, "{range}");
        assert_eq!(r.text(), APP_JS, "{range}");
        assert!(header(&r, "content-range").is_none(), "{range}");
    }
}

/// DEFECT (with the one above). `If-Range` (RFC 9110 §13.1.5): the range only when the
/// representation is still the one the client has (its strong ETag); otherwise, or with a date
/// (no `Last-Modified` is sent, so none can match) or a weak tag, the whole new file. Ranges
/// are for GET only (HEAD answers as GET without `Range`), and `If-None-Match` is evaluated
/// first (304).
#[tokio::test]
async fn if_range_head_and_conditionals_around_ranges() {
    let Spa { h, root } = spa().await;
    let etag = header(&fetch(&h, "/app.js").await, "etag")
        .unwrap()
        .to_owned();
    let weak = format!("W/{etag}");
    let r = fetch_with(
        &h,
        "/app.js",
        &[("range", "bytes=0-1"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.text(), "ab");
    for if_range in [
        "\"other\"",
        weak.as_str(),
        "Wed, 21 Oct 2015 07:28:00 GMT",
        "",
    ] {
        let r = fetch_with(
            &h,
            "/app.js",
            &[("range", "bytes=0-1"), ("if-range", if_range)],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{if_range:?}");
        assert_eq!(r.text(), APP_JS, "{if_range:?}");
    }
    // HEAD ignores Range.
    let head = send(
        h.addr,
        Method::HEAD,
        "/app.js",
        &[("range", "bytes=0-1")],
        Bytes::new(),
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(header(&head, "content-length"), Some("26"));
    assert_eq!(header(&head, "accept-ranges"), Some("bytes"));
    // If-None-Match first.
    let r = fetch_with(
        &h,
        "/app.js",
        &[("range", "bytes=0-1"), ("if-none-match", &etag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(header(&r, "content-range").is_none());
    // A new deploy: the old tag no longer matches, the whole new file comes back.
    write(&root.join("app.js"), "NEW CONTENT, LONGER THAN BEFORE");
    let r = fetch_with(
        &h,
        "/app.js",
        &[("range", "bytes=0-1"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "NEW CONTENT, LONGER THAN BEFORE");
}

/// DEFECT. The cache kept a file while its size and modification time were those it was read
/// with. Deploys carry the build's modification times over (`rsync -a`, `tar -x`, `cp -p`),
/// and reproducible builds (`SOURCE_DATE_EPOCH`, Bazel's `pkg_tar`, Nix) give every release's
/// files the same one; a new `index.html` naming new hashed bundles of the same length has
/// the same size. Such a release went unseen: the old page (naming bundles the deploy may have
/// deleted) was served from memory, with its old ETag, until a restart. Now the inode and the
/// status change time, which no tool sets back, are compared too. (Before: `release-1` each
/// time.)
#[tokio::test]
async fn a_release_with_the_same_size_and_modification_time_is_served_at_once() {
    let Spa { h, root } = spa().await;
    let page = root.join("page.html");
    write(&page, "release-1");
    let first = fetch(&h, "/page.html").await;
    assert_eq!(first.text(), "release-1");
    let mtime = std::fs::metadata(&page).unwrap().modified().unwrap();
    let set_mtime = |path: &std::path::Path| {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    };
    // `rsync -a`, `tar -x`: a new file under another name, renamed over the old one.
    let staged = root.join("staging/page.html");
    write(&staged, "release-2");
    set_mtime(&staged);
    std::fs::rename(&staged, &page).unwrap();
    assert_eq!(std::fs::metadata(&page).unwrap().modified().unwrap(), mtime);
    let second = fetch(&h, "/page.html").await;
    assert_eq!(second.text(), "release-2");
    assert_ne!(header(&second, "etag"), header(&first, "etag"));
    // A validator of the old content no longer matches.
    let etag = header(&first, "etag").unwrap().to_owned();
    let r = fetch_with(&h, "/page.html", &[("if-none-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.text(), "release-2");
    // `cp -p`: written in place (same inode), the time set back. The status change time has
    // the kernel clock's coarse resolution (a few ms): the write comes well after the rename.
    std::thread::sleep(std::time::Duration::from_millis(50));
    std::fs::write(&page, "release-3").unwrap();
    set_mtime(&page);
    assert_eq!(fetch(&h, "/page.html").await.text(), "release-3");
}

/// DEFECT. `If-Match` was ignored, though RFC 9110 evaluates it first (§13.2.2) and an origin
/// server must not ignore it (§13.1.1). A download resumed with `Range` and `If-Match` (the
/// tag of the bytes it holds) after a deploy changed the file got a 206 of the new content,
/// which it spliced onto the old: a corrupt file. Now a strong match (or `*`) is served as
/// before, anything else is 412 `{"error":"precondition_failed"}` (none of the file),
/// before `If-None-Match` and `Range`.
/// (Before: 206 `W CONTENT` for the resumed download, 200 or 304 for the others.)
#[tokio::test]
async fn if_match_is_evaluated_first_and_a_mismatch_is_412() {
    let Spa { h, root } = spa().await;
    let etag = header(&fetch(&h, "/app.js").await, "etag")
        .unwrap()
        .to_owned();
    let listed = format!("\"x\", {etag}");
    for if_match in [etag.as_str(), "*", listed.as_str()] {
        let r = fetch_with(
            &h,
            "/app.js",
            &[("range", "bytes=0-1"), ("if-match", if_match)],
        )
        .await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{if_match}");
        assert_eq!(r.text(), "ab", "{if_match}");
    }
    // Weak tags never match (strong comparison), nor does another tag: 412, whatever else
    // the request asks, `If-None-Match` included.
    let weak = format!("W/{etag}");
    for if_match in [weak.as_str(), "\"other\""] {
        for other in [
            ("range", "bytes=0-1"),
            ("if-none-match", etag.as_str()),
            ("if-none-match", "\"other\""),
            ("accept-encoding", "identity"),
        ] {
            let r = fetch_with(&h, "/app.js", &[("if-match", if_match), other]).await;
            assert_eq!(
                r.status,
                StatusCode::PRECONDITION_FAILED,
                "{if_match} {other:?}"
            );
            assert_eq!(
                r.text(),
                r#"{"error":"precondition_failed"}"#,
                "{if_match} {other:?}"
            );
            assert!(header(&r, "content-range").is_none());
            assert!(header(&r, "etag").is_none());
            assert_eq!(header(&r, "content-type"), Some("application/json"));
            assert_eq!(header(&r, "cache-control"), Some("no-store"));
        }
        let head = send(
            h.addr,
            Method::HEAD,
            "/app.js",
            &[("if-match", if_match)],
            Bytes::new(),
        )
        .await;
        assert_eq!(head.status, StatusCode::PRECONDITION_FAILED, "{if_match}");
    }
    // The resumed download after a deploy: nothing of the new content.
    write(&root.join("app.js"), "NEW CONTENT");
    let r = fetch_with(&h, "/app.js", &[("range", "bytes=2-"), ("if-match", &etag)]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED, "{}", r.text());
    assert_eq!(r.text(), r#"{"error":"precondition_failed"}"#);
    // Two tags, four requests and a HEAD each, then the resumed download.
    assert_eq!(refusals(&h, "precondition_failed").await, 11);
}

/// `countersign_refusals_total{reason}` in a scrape of the proxy's admin listener.
async fn refusals(h: &Harness, reason: &str) -> u64 {
    let scrape = send(h.admin, Method::GET, "/metrics", &[], Bytes::new())
        .await
        .text();
    let prefix = format!("countersign_refusals_total{{reason=\"{reason}\"}} ");
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no refusals series for {reason}:\n{scrape}"))
}

// ---------------------------------------------------------------------------------------------
// Guards (attacks already refused; pinned so they stay refused)
// ---------------------------------------------------------------------------------------------

/// GUARD. Traversal spellings not in tests/proxy_static.rs: overlong UTF-8 dots and slashes,
/// `;` path parameters, mixed-case escapes, raw bytes above 0x7F, invalid UTF-8, backslashes
/// in raw form. All are 400 before any file is looked at, and nothing outside the root leaks.
#[tokio::test]
async fn more_traversal_spellings_are_refused() {
    let Spa { h, .. } = spa().await;
    for target in [
        "/%c0%ae%c0%ae/secret.txt",
        "/%c0%af..%c0%afsecret.txt",
        "/%e0%80%ae%e0%80%ae/secret.txt",
        "/..;/secret.txt",
        "/assets/..;x/..;x/secret.txt",
        "/%2e%2E/secret.txt",
        "/.%2e/secret.txt",
        "/%2e./secret.txt",
        "/\\..\\secret.txt",
        "/..\\secret.txt",
        "/%ff/secret.txt",
        "/a%00.js",
        "//secret.txt",
        "/assets//../secret.txt",
        "/%5c..%5csecret.txt",
        "/C:%5cWindows%5cwin.ini",
    ] {
        let answer = raw_get(&h, target).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{target}: {answer}");
        assert!(!answer.contains("SECRET"), "{target}");
    }
}

/// GUARD. Spellings that pass the path checks but must still not escape: double encoding
/// (`%252e%252e` is a file literally named `%2e%2e`), fullwidth dots, three dots (a hidden
/// name), Windows drive letters and an absolute-form request target. None leaks a byte from
/// outside the root; each is a 404 or the app shell.
#[tokio::test]
async fn lookalike_traversals_stay_inside_the_root() {
    let Spa { h, .. } = spa().await;
    for target in [
        "/%252e%252e/secret.txt",
        "/%252e%252e%252fsecret.txt",
        "/%EF%BC%8E%EF%BC%8E/secret.txt",
        "/.../secret.txt",
        "/C:/Windows/win.ini",
        "/C:",
        "http://x/../secret.txt",
        "http://x/%2e%2e/secret.txt",
    ] {
        let answer = raw_get(&h, target).await;
        assert!(!answer.contains("SECRET"), "{target}: {answer}");
        assert!(
            answer.starts_with("HTTP/1.1 404")
                || answer.starts_with("HTTP/1.1 400")
                || (answer.starts_with("HTTP/1.1 200") && answer.ends_with(INDEX)),
            "{target}: {answer}"
        );
    }
}

/// GUARD. Symlinks: to a file outside the root, to a folder whose name merely starts with the
/// root's (`dist-private`, which a string-prefix check would let through), and to a file
/// without extension there (which would otherwise be a client route). Not one byte leaks.
#[tokio::test]
async fn symlinks_out_of_the_root_never_leak() {
    let Spa { h, .. } = spa().await;
    for path in [
        "/escape.txt",
        "/private/secret.txt",
        "/private/secret",
        "/private/",
        "/noext-escape",
    ] {
        let r = fetch(&h, path).await;
        assert!(!r.text().contains("SECRET"), "{path}: {}", r.text());
        assert!(
            r.status == StatusCode::NOT_FOUND || r.text() == INDEX,
            "{path}: {} {}",
            r.status,
            r.text()
        );
    }
}

/// GUARD. Hidden files and folders, however spelled, at any depth, also under `.well-known`.
#[tokio::test]
async fn dotfiles_are_404_at_any_depth_and_spelling() {
    let Spa { h, .. } = spa().await;
    for path in [
        "/.env",
        "/%2eenv",
        "/%2Eenv",
        "/.git/config",
        "/.git/",
        "/.git",
        "/%2egit/config",
        "/assets/.env",
        "/.well-known/.git/config",
        "/.env?x=1",
    ] {
        let r = fetch(&h, path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert!(!r.text().contains("SECRET"), "{path}");
        let head = send(h.addr, Method::HEAD, path, &[], Bytes::new()).await;
        assert_eq!(head.status, StatusCode::NOT_FOUND, "HEAD {path}");
    }
}

/// GUARD. Only GET and HEAD read files: every other method is 405 with `Allow: GET, HEAD`
/// (nginx: 405 for a static file), on files, folders, client routes and missing files alike,
/// and never carries a file's bytes. A cross-origin POST gets the same 405: nothing changes
/// state, so no CSRF check is involved.
#[tokio::test]
async fn other_methods_are_405_and_serve_nothing() {
    let Spa { h, .. } = spa().await;
    for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"] {
        for path in ["/app.js", "/", "/notes/1", "/missing.js", "/.env"] {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let r = send(
                h.addr,
                method.clone(),
                path,
                &[("origin", "https://evil.example")],
                Bytes::from_static(b"x=1"),
            )
            .await;
            assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_eq!(header(&r, "allow"), Some("GET, HEAD"), "{method} {path}");
            assert!(
                !r.text().contains(APP_JS) && !r.text().contains(INDEX),
                "{method} {path}"
            );
        }
    }
    // TRACE would echo the request (cookies included) back: refused like the others.
    let answer = raw_exchange(
        h.addr,
        b"TRACE /app.js HTTP/1.1\r\nhost: x\r\ncookie: countersign_session=s3cr3t\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    assert!(!answer.contains("s3cr3t"), "{answer}");
}

/// GUARD. Static files are public (docs/OPERATIONS.md: `static_dir` — anyone): no session is
/// needed or looked at, a bogus or stale session cookie changes nothing, no cookie is set.
#[tokio::test]
async fn static_files_need_no_session_and_set_no_cookie() {
    let Spa { h, .. } = spa().await;
    for cookie in [None, Some("countersign_session=bogus"), Some("a=b; c=d")] {
        let headers: Vec<(&str, &str)> = cookie.map(|c| ("cookie", c)).into_iter().collect();
        for path in ["/", "/app.js", "/notes/1"] {
            let r = fetch_with(&h, path, &headers).await;
            assert_eq!(r.status, StatusCode::OK, "{path} {cookie:?}");
            assert!(r.set_cookie().is_none(), "{path} {cookie:?}");
        }
    }
}

/// GUARD. Conditional requests: a 304 carries the validators and caching headers but no body,
/// type or length (RFC 9110 §15.4.5); `If-None-Match: *` matches any existing file; a HEAD of
/// a client route describes `index.html`.
#[tokio::test]
async fn not_modified_and_head_answers_are_well_formed() {
    let Spa { h, .. } = spa().await;
    let full = fetch(&h, "/app.js").await;
    let etag = header(&full, "etag").unwrap().to_owned();
    for inm in [etag.as_str(), "*", &format!("\"x\",{etag}")] {
        let r = fetch_with(&h, "/app.js", &[("if-none-match", inm)]).await;
        assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{inm}");
        assert!(r.body.is_empty());
        assert_eq!(header(&r, "etag"), Some(etag.as_str()));
        assert_eq!(header(&r, "cache-control"), Some("no-cache"));
        assert!(header(&r, "content-length").is_none(), "{inm}");
        assert!(header(&r, "content-type").is_none(), "{inm}");
    }
    // A missing file is a 404 whatever the condition.
    let r = fetch_with(&h, "/missing.js", &[("if-none-match", "*")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let head = send(h.addr, Method::HEAD, "/notes/1", &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(
        header(&head, "content-length"),
        Some(INDEX.len().to_string().as_str())
    );
    assert_eq!(
        header(&head, "content-type"),
        Some("text/html; charset=utf-8")
    );
}

/// GUARD. Query strings play no part in finding the file; very long paths (a segment over
/// NAME_MAX, a path over PATH_MAX) are answered (404 or the app shell), never a 500 or a hang.
#[tokio::test]
async fn query_strings_and_very_long_paths() {
    let Spa { h, .. } = spa().await;
    for target in [
        "/app.js?v=123",
        "/app.js?../../secret.txt",
        "/app.js?%2e%2e",
    ] {
        let r = fetch(&h, target).await;
        assert_eq!(r.status, StatusCode::OK, "{target}");
        assert_eq!(r.text(), APP_JS, "{target}");
    }
    let long_segment = format!("/{}", "a".repeat(300));
    let long_file = format!("/{}.js", "a".repeat(300));
    let deep = "/a".repeat(3000);
    let deep_file = format!("{deep}.js");
    for (target, ok) in [
        (&long_segment, true),
        (&long_file, false),
        (&deep, true),
        (&deep_file, false),
    ] {
        let r = fetch(&h, target).await;
        if ok {
            assert_eq!(r.status, StatusCode::OK, "{}", target.len());
            assert_eq!(r.text(), INDEX);
        } else {
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", target.len());
        }
    }
}

/// GUARD. A file deleted after it was served (and cached) is a 404 at once, not served from
/// memory; a folder put where a file was is not read as one.
#[tokio::test]
async fn deleted_and_replaced_files_are_seen_at_once() {
    let Spa { h, root } = spa().await;
    write(&root.join("gone.js"), "gone()");
    assert_eq!(fetch(&h, "/gone.js").await.text(), "gone()");
    std::fs::remove_file(root.join("gone.js")).unwrap();
    assert_eq!(fetch(&h, "/gone.js").await.status, StatusCode::NOT_FOUND);
    write(&root.join("gone.js/inner.txt"), "folder now");
    let r = fetch(&h, "/gone.js").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
}

/// DEFECT. A lookup that fails for a reason other than "not there" is a broken deploy, and
/// `server.max_static_file`'s documentation promises it a 500 naming the path, never a 404 or
/// the `index.html` fallback, which would hide it. Only the read itself kept that promise: a
/// failed lookup (a folder the proxy may not search, an I/O error, a symlink loop) was taken
/// for a missing file, so `/loop/app.js` answered 404 and `/loop/page` the app shell with 200.
/// A symlink loop stands for them here: unlike a folder's mode, root cannot see past it.
#[tokio::test]
async fn a_lookup_that_fails_is_a_500_not_a_missing_file() {
    let Spa { h, root } = spa().await;
    std::os::unix::fs::symlink(root.join("loop-b"), root.join("loop-a")).unwrap();
    std::os::unix::fs::symlink(root.join("loop-a"), root.join("loop-b")).unwrap();
    for target in ["/loop-a/app.js", "/loop-a/page", "/loop-a", "/loop-a/"] {
        let r = fetch(&h, target).await;
        assert_eq!(
            r.status,
            StatusCode::INTERNAL_SERVER_ERROR,
            "{target}: {}",
            r.text()
        );
        assert_eq!(r.error_code(), "internal_error", "{target}");
        assert!(!r.text().contains(INDEX), "{target}");
    }
    // Still missing, not errors: a name that is not there, one under a file, one too long.
    for (target, status) in [
        ("/nothing.js", StatusCode::NOT_FOUND),
        ("/app.js/inner.js", StatusCode::NOT_FOUND),
        ("/nothing", StatusCode::OK),
        ("/app.js/inner", StatusCode::OK),
    ] {
        let r = fetch(&h, target).await;
        assert_eq!(r.status, status, "{target}: {}", r.text());
    }
    let long = format!("/{}", "b".repeat(300));
    assert_eq!(fetch(&h, &long).await.text(), INDEX);
    // The site still serves.
    assert_eq!(fetch(&h, "/app.js").await.text(), APP_JS);
}

/// DEFECT. A content-addressed build links each served name to a blob (`hashed.js ->
/// blobs/3f2a1c`). The type and the precompressed copy were taken from the blob's name, so
/// `/hashed.js` went out as `application/octet-stream` (which `nosniff` makes a browser refuse
/// to run) and `hashed.js.br` beside it was never found. nginx, too, types by the name asked
/// for. The blob's own name still gets its own type.
#[tokio::test]
async fn a_renaming_symlink_is_typed_and_precompressed_by_the_name_asked_for() {
    let Spa { h, root } = spa().await;
    write(&root.join("blobs/3f2a1c"), "hashed()");
    std::os::unix::fs::symlink(root.join("blobs/3f2a1c"), root.join("hashed.js")).unwrap();
    write(&root.join("hashed.js.br"), "BR-hashed");
    let js = "text/javascript; charset=utf-8";
    let r = fetch(&h, "/hashed.js").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "hashed()");
    assert_eq!(header(&r, "content-type"), Some(js));
    let r = fetch_with(&h, "/hashed.js", &[("accept-encoding", "br")]).await;
    assert_eq!(r.text(), "BR-hashed");
    assert_eq!(header(&r, "content-encoding"), Some("br"));
    assert_eq!(header(&r, "content-type"), Some(js));
    let r = fetch(&h, "/blobs/3f2a1c").await;
    assert_eq!(r.text(), "hashed()");
    assert_eq!(header(&r, "content-type"), Some("application/octet-stream"));
}

/// DEFECT. The same for a folder's `index.html` linked to a blob (`index.html -> blobs/9e1d`):
/// `/` and `/docs/` were typed and precompressed by the blob's name, `/` went out as
/// `application/octet-stream` (with `nosniff`, a download) and its `index.html.br` was never
/// found, while `/index.html` and client routes were right.
#[tokio::test]
async fn a_folder_index_that_is_a_renaming_symlink_is_typed_as_index_html() {
    let Spa { h, root } = spa().await;
    write(&root.join("blobs/9e1d"), INDEX);
    std::fs::remove_file(root.join("index.html")).unwrap();
    std::os::unix::fs::symlink(root.join("blobs/9e1d"), root.join("index.html")).unwrap();
    write(&root.join("index.html.br"), "BR-index");
    std::fs::remove_file(root.join("docs/index.html")).unwrap();
    std::os::unix::fs::symlink(root.join("blobs/9e1d"), root.join("docs/index.html")).unwrap();
    let html = "text/html; charset=utf-8";
    for path in ["/", "/docs/", "/index.html", "/notes/42"] {
        let r = fetch(&h, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text());
        assert_eq!(r.text(), INDEX, "{path}");
        assert_eq!(header(&r, "content-type"), Some(html), "{path}");
    }
    let r = fetch_with(&h, "/", &[("accept-encoding", "br")]).await;
    assert_eq!(r.text(), "BR-index");
    assert_eq!(header(&r, "content-encoding"), Some("br"));
    assert_eq!(header(&r, "content-type"), Some(html));
}

/// DEFECT. The 301 from a folder without its trailing slash had no `Cache-Control`, though
/// every other answer here states one. A 301 is heuristically cacheable (RFC 9110 §15.4.2):
/// browsers keep it as long as they like, so after a deploy that made `/docs` a file, or
/// removed the folder (a client route again), a browser that had followed the redirect once
/// went on asking for `/docs/`. (Before: no `Cache-Control` at all.)
#[tokio::test]
async fn the_folder_redirect_is_not_cached_without_revalidation() {
    let Spa { h, .. } = spa().await;
    for target in ["/docs", "/docs?x=1"] {
        let r = fetch(&h, target).await;
        assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY, "{target}");
        assert_eq!(header(&r, "cache-control"), Some("no-cache"), "{target}");
        let head = send(h.addr, Method::HEAD, target, &[], Bytes::new()).await;
        assert_eq!(head.status, StatusCode::MOVED_PERMANENTLY, "HEAD {target}");
        assert_eq!(
            header(&head, "cache-control"),
            Some("no-cache"),
            "HEAD {target}"
        );
    }
}

/// DEFECT. A suffix range (`bytes=-5`) of an empty file answered 416. RFC 9110 §14.1.2: "When
/// a selected representation has zero length, the only satisfiable form of range-spec in a
/// GET request is a suffix-range with a non-zero suffix-length", so 416 (for unsatisfiable
/// ranges, §15.5.17) was wrong; and no `Content-Range` can describe the nothing it selects.
/// §14.2 lets a server ignore `Range` on a representation with no content: the empty file,
/// 200. A zero suffix (`bytes=-0`) and a first position (`bytes=0-`) are unsatisfiable there:
/// still 416 `bytes */0`. (Before: 416 for `bytes=-5` too.)
#[tokio::test]
async fn a_suffix_range_of_an_empty_file_gets_the_empty_file() {
    let Spa { h, .. } = spa().await;
    let etag = header(&fetch(&h, "/empty.txt").await, "etag")
        .unwrap()
        .to_owned();
    for headers in [
        vec![("range", "bytes=-5")],
        vec![("range", "bytes=-1")],
        vec![("range", "bytes=-99999999999999999999999999")],
        vec![("range", "bytes=-5"), ("if-range", etag.as_str())],
    ] {
        let r = fetch_with(&h, "/empty.txt", &headers).await;
        assert_eq!(r.status, StatusCode::OK, "{headers:?}: {}", r.text());
        assert!(r.body.is_empty(), "{headers:?}");
        assert!(header(&r, "content-range").is_none(), "{headers:?}");
        assert_eq!(header(&r, "content-length"), Some("0"), "{headers:?}");
        assert_eq!(header(&r, "etag"), Some(etag.as_str()), "{headers:?}");
        assert_eq!(header(&r, "cache-control"), Some("no-cache"), "{headers:?}");
    }
    for range in ["bytes=-0", "bytes=0-", "bytes=0-0"] {
        let r = fetch_with(&h, "/empty.txt", &[("range", range)]).await;
        assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(header(&r, "content-range"), Some("bytes */0"), "{range}");
        assert_eq!(r.text(), r#"{"error":"range_not_satisfiable"}"#, "{range}");
    }
}

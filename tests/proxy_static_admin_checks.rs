//! The static file server and the admin listener, each test from a defect a QA pass found: a
//! repointed `static_dir` symlink is served at once, a full cache drops the least recently
//! served file, `/.well-known/` is served while other hidden files are not, the latency
//! histogram stays cumulative while requests are recorded, and the admin probes answer HEAD.
//! Run: `cargo test --all-features --test proxy_static_admin_checks`.
#![cfg(feature = "proxy")]

mod support;

use std::time::Duration;

use bytes::Bytes;
use countersign::proxy::metrics::Metrics;
use countersign::proxy::static_files::{Site, StaticDir};
use http::{Method, StatusCode};
use support::*;

async fn start_site(dir: StaticDir) -> Harness {
    Harness::start_with(HarnessOptions {
        site: Some(Site::Dir(dir)),
        ..HarnessOptions::default()
    })
    .await
}

async fn fetch(h: &Harness, path: &str) -> Reply {
    send(h.addr, Method::GET, path, &[], Bytes::new()).await
}

/// The usual atomic deploy (Capistrano, git-sync, `ln -sfn releases/N current`): `static_dir`
/// is a symlink that a deploy repoints. CONFIG.md promises for `static_cache_size`: "checked
/// against the file's size and modification time on each request (a new deploy is served at
/// once)". The root is resolved on every request. (A QA pass found it canonicalized once at
/// start, so the old release was served until a restart.)
#[tokio::test]
async fn a_deploy_that_repoints_the_static_dir_symlink_is_served_at_once() {
    let base = temp_dir("static-swap");
    write(&base.join("rel1/index.html"), "release 1");
    write(&base.join("rel2/index.html"), "release 2");
    write(&base.join("rel2/assets/new-abc123.js"), "new()");
    let current = base.join("current");
    std::os::unix::fs::symlink(base.join("rel1"), &current).unwrap();
    let h = start_site(StaticDir::new(&current).unwrap()).await;
    assert_eq!(fetch(&h, "/").await.text(), "release 1");

    // Atomic swap: a new link renamed over the old one.
    let tmp = base.join("current.tmp");
    std::os::unix::fs::symlink(base.join("rel2"), &tmp).unwrap();
    std::fs::rename(&tmp, &current).unwrap();

    assert_eq!(
        fetch(&h, "/").await.text(),
        "release 2",
        "old release served"
    );
    assert_eq!(fetch(&h, "/notes").await.text(), "release 2");
    let asset = fetch(&h, "/assets/new-abc123.js").await;
    assert_eq!(asset.status, StatusCode::OK, "{}", asset.text());
}

/// CONFIG.md, `static_cache_size`: "When full, the least recently served entries are dropped
/// first". Which entry is kept is observed through a same-size, same-mtime rewrite (a kept
/// entry is then served stale). Ten rounds. (A QA pass found it dropped the first key of a
/// `HashMap`, in random order: all ten rounds kept the oldest entry with probability 2^-10.)
#[tokio::test]
async fn a_full_static_cache_drops_the_oldest_entry() {
    let mut kept_oldest = 0;
    for round in 0..10 {
        let base = temp_dir("static-evict");
        let root = base.join("dist");
        write(&root.join("index.html"), "<!doctype html>");
        write(&root.join("a.js"), &"a".repeat(400));
        write(&root.join("b.js"), &"b".repeat(400));
        write(&root.join("c.js"), &"c".repeat(400));
        let dir = StaticDir::new(&root).unwrap().max_cache_bytes(1000);
        let h = start_site(dir.clone()).await;
        // a is read first (oldest), then b, then c: c does not fit beside both, one goes.
        for name in ["a", "b", "c"] {
            assert_eq!(
                fetch(&h, &format!("/{name}.js")).await.text(),
                name.repeat(400)
            );
        }
        assert_eq!(dir.cached_bytes(), 800);
        // Rewrite a.js with other bytes of the same size and the same mtime: served stale
        // only if a.js is still in memory.
        let path = root.join("a.js");
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, "A".repeat(400)).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        if fetch(&h, "/a.js").await.text() == "a".repeat(400) {
            kept_oldest += 1;
            eprintln!("round {round}: the oldest entry (a.js) was kept, a newer one dropped");
        }
    }
    assert_eq!(
        kept_oldest, 0,
        "the oldest entry was kept (a newer one dropped) in {kept_oldest} of 10 rounds"
    );
}

/// SPA builds ship `/.well-known/` (Vite copies `public/.well-known/`): `security.txt`
/// (RFC 9116), `apple-app-site-association` (iOS universal links), `assetlinks.json` (Android
/// app links). Hidden files are refused to keep `.env` / `.git` private, but the usual rule
/// (nginx `location ~ /\.(?!well-known)`) exempts `.well-known`, which RFC 8615 reserves for
/// exactly this. (A QA pass found it answered 404.)
#[tokio::test]
async fn well_known_files_are_served_while_other_hidden_files_are_not() {
    let base = temp_dir("static-wellknown");
    let root = base.join("dist");
    write(&root.join("index.html"), "<!doctype html>");
    write(
        &root.join(".well-known/security.txt"),
        "Contact: mailto:security@example.com\n",
    );
    write(&root.join(".well-known/assetlinks.json"), "[]");
    write(&root.join(".env"), "SECRET=1");
    let h = start_site(StaticDir::new(&root).unwrap()).await;
    // Hidden files stay private.
    assert_eq!(fetch(&h, "/.env").await.status, StatusCode::NOT_FOUND);
    let r = fetch(&h, "/.well-known/security.txt").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.text(), "Contact: mailto:security@example.com\n");
    let r = fetch(&h, "/.well-known/assetlinks.json").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

/// A Prometheus histogram's buckets are cumulative: every `_bucket` value is at most the
/// `le="+Inf"` one (which must equal `_count`). `+Inf` and `_count` are derived from the bucket
/// values read in the same scrape. (A QA pass found a separate count, read after the buckets,
/// which a scrape between a request's two adds showed below `le="10"`: Prometheus's
/// `histogram_quantile` then warns and the quantile is wrong.)
#[test]
fn histogram_buckets_never_exceed_the_inf_bucket_during_concurrent_recording() {
    let metrics = std::sync::Arc::new(Metrics::new(["api"]));
    let route = metrics.upstream_route(0);
    // A route's latency series appear with its first request.
    metrics.record_request(route, 200, Duration::from_micros(500));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|_| {
            let metrics = metrics.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    metrics.record_request(route, 200, Duration::from_micros(500));
                }
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut violation = None;
    let mut scrapes = 0u64;
    while std::time::Instant::now() < deadline && violation.is_none() {
        let text = metrics.render(Some(0), &[]);
        scrapes += 1;
        let value = |prefix: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {prefix} in {text}"))
        };
        let last =
            value("countersign_request_duration_seconds_bucket{route=\"upstream/api\",le=\"10\"}");
        let inf = value(
            "countersign_request_duration_seconds_bucket{route=\"upstream/api\",le=\"+Inf\"}",
        );
        if last > inf {
            violation = Some(format!("le=\"10\" {last} > le=\"+Inf\" {inf}"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    assert!(
        violation.is_none(),
        "non-cumulative histogram after {scrapes} scrapes: {}",
        violation.unwrap_or_default()
    );
}

/// RFC 9110 §9.3.2: HEAD is GET without the body; uptime monitors (UptimeRobot's default, `curl
/// -I`, some load balancers) probe with it. The admin listener answers HEAD on `/healthz`,
/// `/readyz` and `/metrics` as GET, without the body. (A QA pass found 405.)
#[tokio::test]
async fn admin_probes_answer_head_like_get() {
    let h = Harness::start().await;
    for path in ["/healthz", "/metrics"] {
        let get = send(h.admin, Method::GET, path, &[], Bytes::new()).await;
        assert_eq!(get.status, StatusCode::OK, "GET {path}");
        let head = send(h.admin, Method::HEAD, path, &[], Bytes::new()).await;
        assert_eq!(head.status, StatusCode::OK, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path}");
    }
}

/// `server.static_immutable`: files under a listed folder (content-hashed build output) are
/// sent `immutable` for a year; everything else, and `index.html` also where a client route
/// under that folder falls back to it, stays `no-cache`.
#[tokio::test]
async fn hashed_asset_folders_are_immutable_and_everything_else_revalidates() {
    let dir = temp_dir("static-immutable");
    std::fs::write(dir.join("index.html"), "<p>app</p>").unwrap();
    std::fs::create_dir(dir.join("assets")).unwrap();
    std::fs::write(dir.join("assets/app-3f9a1c2b.js"), "console.log(1)").unwrap();
    std::fs::write(dir.join("favicon.ico"), "ico").unwrap();
    let site = StaticDir::new(&dir)
        .unwrap()
        .immutable_prefixes(vec!["/assets/".to_owned()]);
    let h = start_site(site).await;
    let cache_control = |r: &Reply| r.headers["cache-control"].to_str().unwrap().to_owned();
    let asset = fetch(&h, "/assets/app-3f9a1c2b.js").await;
    assert_eq!(asset.status, StatusCode::OK);
    assert_eq!(cache_control(&asset), "public, max-age=31536000, immutable");
    for path in [
        "/",
        "/index.html",
        "/favicon.ico",
        "/notes/7",
        "/assets/",
        "/assets-x",
    ] {
        let r = fetch(&h, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(cache_control(&r), "no-cache", "{path}");
    }
    assert_eq!(
        fetch(&h, "/assets/missing.js").await.status,
        StatusCode::NOT_FOUND
    );
    // Answers to one client's condition are not the file: a 416 (a range past its end) or a
    // 412 (another ETag) must not be kept for a year by a cache that keys on the URL alone,
    // which would then answer every later request for the asset with it. A part (206) is
    // the file's and stays immutable.
    let asset = "/assets/app-3f9a1c2b.js";
    for (headers, status, expected) in [
        (
            [("range", "bytes=500-600")],
            StatusCode::RANGE_NOT_SATISFIABLE,
            "no-store",
        ),
        (
            [("if-match", "\"another\"")],
            StatusCode::PRECONDITION_FAILED,
            "no-store",
        ),
        (
            [("range", "bytes=0-3")],
            StatusCode::PARTIAL_CONTENT,
            "public, max-age=31536000, immutable",
        ),
    ] {
        let r = send(h.addr, Method::GET, asset, &headers, Bytes::new()).await;
        assert_eq!(r.status, status, "{headers:?}");
        assert_eq!(cache_control(&r), expected, "{headers:?}");
    }
}

//! The SPA's assets, served from the proxy's own origin (so the session cookie can be
//! `SameSite=Strict` and no CORS is needed).
//!
//! - Paths are decoded segment by segment; `.`/`..` segments, encoded slashes or backslashes,
//!   NUL bytes and hidden files (leading `.`) are refused, and the resolved file must lie under
//!   the canonical root (no symlink escapes).
//! - Strong `ETag` (SHA-256 of the content) with `If-None-Match` → 304.
//! - A path whose last segment has no extension and matches no file is a client-side route:
//!   it gets `index.html`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{Either, Full};
use percent_encoding::percent_decode_str;
use sha2::{Digest as _, Sha256};

use super::error::{ProxyBody, ProxyError};

/// Default cap on the size of one served file: assets are read whole into memory.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 32 * 1024 * 1024;

/// Default bound on the file contents kept in memory between requests
/// (`server.static_cache_size`).
pub const DEFAULT_MAX_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// What the proxy serves outside `/auth/` and the upstream prefixes.
#[derive(Debug, Clone)]
pub enum Site {
    /// Files from a directory (an SPA build).
    Dir(StaticDir),
    /// One built-in HTML page at `/` (the `dev` demo page).
    Page(EmbeddedPage),
}

impl Site {
    /// Answers a GET or HEAD for `raw_path` (as received, percent-encoded).
    pub async fn serve(
        &self,
        method: &Method,
        raw_path: &str,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if *method != Method::GET && *method != Method::HEAD {
            return Err(ProxyError::MethodNotAllowed { allow: "GET, HEAD" });
        }
        match self {
            Site::Dir(dir) => dir.serve(method, raw_path, headers).await,
            Site::Page(page) => page.serve(method, raw_path, headers),
        }
    }
}

/// A directory of static files.
///
/// Contents are kept in memory once read (`server.static_cache_size`), with their ETag: every download of
/// a file then shares one buffer. Read per request instead, 400 concurrent downloads of a
/// 240 KiB bundle held 400 copies (200 MiB) and as many blocking threads.
#[derive(Debug, Clone)]
pub struct StaticDir {
    /// The folder as configured (`static_dir`), resolved again on every request: a deploy that
    /// repoints a symlink (`ln -sfn releases/N current`) is served at once, like a changed file.
    root: PathBuf,
    max_file_bytes: u64,
    /// Request path prefixes whose files are content-hashed (`server.static_immutable`).
    immutable_prefixes: Arc<[String]>,
    cache: Arc<parking_lot::Mutex<FileCache>>,
}

/// Files read before, each kept while the file's size and modification time are the ones it
/// was read with (checked on every request: a new deploy is served at once), and all of them
/// within a byte budget. When a file does not fit, the least recently served ones are dropped
/// until it does (after a deploy, the old assets no page asks for any more go first, and a file
/// every page load asks for, `index.html`, stays); a file larger than the whole budget is
/// served without being kept.
#[derive(Debug)]
struct FileCache {
    entries: HashMap<PathBuf, CachedFile>,
    /// Each entry's last use, oldest first: the key of `entries[path].used` maps to `path`.
    by_use: BTreeMap<u64, PathBuf>,
    /// The use counter (the next use's number).
    uses: u64,
    bytes: u64,
    max_bytes: u64,
}

#[derive(Debug, Clone)]
struct CachedFile {
    len: u64,
    modified: Option<SystemTime>,
    content: Bytes,
    etag: HeaderValue,
    /// When it was last served (`FileCache::uses`).
    used: u64,
}

impl FileCache {
    fn new(max_bytes: u64) -> Self {
        FileCache {
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            uses: 0,
            bytes: 0,
            max_bytes,
        }
    }

    fn next_use(&mut self) -> u64 {
        self.uses += 1;
        self.uses
    }

    /// The cached content of `path` if it was read with this size and modification time (and
    /// marks it used now).
    fn get(&mut self, path: &Path, len: u64, modified: Option<SystemTime>) -> Option<CachedFile> {
        let now = self.next_use();
        let entry = self
            .entries
            .get_mut(path)
            .filter(|c| c.len == len && c.modified.is_some() && c.modified == modified)?;
        if let Some(key) = self.by_use.remove(&entry.used) {
            self.by_use.insert(now, key);
        }
        entry.used = now;
        Some(entry.clone())
    }

    fn remove(&mut self, path: &Path) {
        if let Some(old) = self.entries.remove(path) {
            self.bytes -= old.len;
            self.by_use.remove(&old.used);
        }
    }

    fn insert(&mut self, path: PathBuf, mut file: CachedFile) {
        self.remove(&path);
        // Without a modification time a change could not be seen: not kept.
        if file.len > self.max_bytes || file.modified.is_none() {
            return;
        }
        while self.bytes + file.len > self.max_bytes {
            let Some((_, victim)) = self.by_use.pop_first() else {
                break;
            };
            if let Some(old) = self.entries.remove(&victim) {
                self.bytes -= old.len;
            }
        }
        file.used = self.next_use();
        self.by_use.insert(file.used, path.clone());
        self.bytes += file.len;
        self.entries.insert(path, file);
    }
}

impl StaticDir {
    /// Serves files under `root`, which must be a folder now (it is resolved again on every
    /// request: see [`StaticDir`]'s `root`).
    pub fn new(root: &Path) -> std::io::Result<Self> {
        if !std::fs::canonicalize(root)?.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(StaticDir {
            root: root.to_owned(),
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            immutable_prefixes: Arc::from([]),
            cache: Arc::new(parking_lot::Mutex::new(FileCache::new(
                DEFAULT_MAX_CACHE_BYTES,
            ))),
        })
    }

    /// Sets the bound on file contents kept in memory (`server.static_cache_size`; 0: none).
    pub fn max_cache_bytes(self, max: u64) -> Self {
        self.cache.lock().max_bytes = max;
        self
    }

    /// Bytes of file contents held in memory now (tests, metrics).
    pub fn cached_bytes(&self) -> u64 {
        self.cache.lock().bytes
    }

    /// Marks files under these request path prefixes (each a folder: `/assets/`) as never
    /// changing (`server.static_immutable`): a build tool's content-hashed assets, whose name
    /// changes with their content. They are sent with `Cache-Control: public, max-age=31536000,
    /// immutable`, so a browser does not even revalidate them; everything else (`index.html`
    /// above all) keeps `no-cache`.
    pub fn immutable_prefixes(mut self, prefixes: Vec<String>) -> Self {
        self.immutable_prefixes = prefixes.into();
        self
    }

    /// Sets the largest file served (`server.max_static_file`). A bigger file is a deployment
    /// problem, not a missing file: it answers 500 `internal_error`, and the log names the
    /// file, its size and the key to raise.
    pub fn max_file_bytes(mut self, max: u64) -> Self {
        self.max_file_bytes = max;
        self
    }

    async fn serve(
        &self,
        method: &Method,
        raw_path: &str,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let segments = decode_path(raw_path)?;
        // The folder this request is served from, resolved now (a deploy may have repointed
        // a symlink since the last request).
        let root = tokio::fs::canonicalize(&self.root).await.map_err(|e| {
            ProxyError::Internal(format!(
                "static_dir {} cannot be resolved: {e}",
                self.root.display()
            ))
        })?;
        let mut candidate = root.clone();
        for segment in &segments {
            candidate.push(segment);
        }
        let is_client_route = segments.last().is_none_or(|last| !last.contains('.'));
        let (found, fallback) = match self.resolve(&root, candidate).await? {
            Some(found) => (found, false),
            None if is_client_route => (
                self.resolve(&root, root.join("index.html"))
                    .await?
                    .ok_or(ProxyError::NotFound)?,
                true,
            ),
            None => return Err(ProxyError::NotFound),
        };
        // Only the file asked for, never the `index.html` a client route falls back to.
        let immutable = !fallback
            && self
                .immutable_prefixes
                .iter()
                .any(|prefix| raw_path.starts_with(prefix.as_str()));
        let content_type = content_type_for(&found.path);
        let cached = self
            .cache
            .lock()
            .get(&found.path, found.len, found.modified);
        let file = match cached {
            Some(file) => file,
            None => {
                let content = Bytes::from(
                    tokio::fs::read(&found.path)
                        .await
                        .map_err(|_| ProxyError::NotFound)?,
                );
                let file = CachedFile {
                    // What was read (the file may have changed since it was looked at: then
                    // its size or time differ next time, and it is read again).
                    len: content.len() as u64,
                    modified: found.modified.filter(|_| content.len() as u64 == found.len),
                    etag: etag_for(&content),
                    content,
                    used: 0,
                };
                self.cache.lock().insert(found.path, file.clone());
                file
            }
        };
        Ok(respond(
            method,
            headers,
            file.content,
            &file.etag,
            &content_type,
            immutable,
        ))
    }

    /// The canonical regular file for `candidate` (a directory means its `index.html`), if it
    /// exists under the root; an error when it exists but is over the size limit (so a
    /// too-large file is never mistaken for a client route and answered with `index.html`).
    async fn resolve(
        &self,
        root: &Path,
        candidate: PathBuf,
    ) -> Result<Option<FoundFile>, ProxyError> {
        let Some(found) = existing_file(root, candidate).await else {
            return Ok(None);
        };
        if found.len > self.max_file_bytes {
            return Err(ProxyError::Internal(format!(
                "static file {} is {} bytes, over server.max_static_file ({} bytes)",
                found.path.display(),
                found.len,
                self.max_file_bytes
            )));
        }
        Ok(Some(found))
    }
}

/// The canonical regular file for `candidate` (a directory means its `index.html`), if it
/// exists under `root` (canonical), with its size.
async fn existing_file(root: &Path, candidate: PathBuf) -> Option<FoundFile> {
    let mut path = tokio::fs::canonicalize(&candidate).await.ok()?;
    if !path.starts_with(root) {
        tracing::warn!(
            path = &*candidate.to_string_lossy(),
            "static path resolves outside the root"
        );
        return None;
    }
    let mut meta = tokio::fs::metadata(&path).await.ok()?;
    if meta.is_dir() {
        path = tokio::fs::canonicalize(path.join("index.html"))
            .await
            .ok()?;
        if !path.starts_with(root) {
            return None;
        }
        meta = tokio::fs::metadata(&path).await.ok()?;
    }
    meta.is_file().then(|| FoundFile {
        path,
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

/// A regular file under the root, as looked at for this request.
struct FoundFile {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

/// The built-in page of `dev` mode, served at `/` (and `/index.html`).
#[derive(Debug, Clone)]
pub struct EmbeddedPage {
    html: Bytes,
    etag: HeaderValue,
}

impl EmbeddedPage {
    /// A page with this HTML.
    pub fn new(html: &'static str) -> Self {
        EmbeddedPage {
            html: Bytes::from_static(html.as_bytes()),
            etag: etag_for(html.as_bytes()),
        }
    }

    fn serve(
        &self,
        method: &Method,
        raw_path: &str,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if raw_path != "/" && raw_path != "/index.html" {
            return Err(ProxyError::NotFound);
        }
        Ok(respond(
            method,
            headers,
            self.html.clone(),
            &self.etag,
            "text/html; charset=utf-8",
            false,
        ))
    }
}

/// Decodes a request path into safe file-name segments, or refuses it.
fn decode_path(raw_path: &str) -> Result<Vec<String>, ProxyError> {
    if !raw_path.starts_with('/') {
        return Err(ProxyError::BadRequest("path must start with /".into()));
    }
    let mut segments = Vec::new();
    for raw in raw_path.split('/').filter(|s| !s.is_empty()) {
        let decoded = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| ProxyError::BadRequest("path is not UTF-8".into()))?;
        if decoded == "." || decoded == ".." {
            return Err(ProxyError::BadRequest("dot segment in path".into()));
        }
        if decoded.contains(['/', '\\', '\0']) {
            return Err(ProxyError::BadRequest("encoded separator in path".into()));
        }
        // Hidden files (.env, .git) are never part of a build's public output; `.well-known`
        // (RFC 8615: security.txt, app links) is, where a build tool copies it.
        if decoded.starts_with('.') && !(segments.is_empty() && decoded == ".well-known") {
            return Err(ProxyError::NotFound);
        }
        segments.push(decoded.into_owned());
    }
    Ok(segments)
}

fn content_type_for(path: &Path) -> String {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    let essence = mime.essence_str();
    if mime.type_() == mime_guess::mime::TEXT
        || essence == "application/javascript"
        || essence == "application/json"
        || essence == "image/svg+xml"
    {
        format!("{essence}; charset=utf-8")
    } else {
        essence.to_owned()
    }
}

fn etag_for(content: &[u8]) -> HeaderValue {
    let digest = Sha256::digest(content);
    let mut tag = String::with_capacity(34);
    tag.push('"');
    for b in &digest[..16] {
        use std::fmt::Write as _;
        let _ = write!(tag, "{b:02x}");
    }
    tag.push('"');
    // Hex digits between quotes: always a valid field value.
    HeaderValue::try_from(tag).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

/// Weak comparison (RFC 9110 §13.1.2): `If-None-Match` matches if any listed tag, ignoring
/// `W/`, equals ours, or it is `*`.
fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    headers.get_all(IF_NONE_MATCH).iter().any(|value| {
        value.to_str().is_ok_and(|list| {
            list.split(',').map(str::trim).any(|candidate| {
                candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == etag
            })
        })
    })
}

fn respond(
    method: &Method,
    headers: &HeaderMap,
    content: Bytes,
    etag: &HeaderValue,
    content_type: &str,
    immutable: bool,
) -> Response<ProxyBody> {
    let not_modified = none_match(headers, etag.to_str().unwrap_or_default());
    let body = if not_modified || *method == Method::HEAD {
        Bytes::new()
    } else {
        content.clone()
    };
    let mut response = Response::new(Either::Right(Full::new(body)));
    if not_modified {
        *response.status_mut() = StatusCode::NOT_MODIFIED;
    }
    let h = response.headers_mut();
    h.insert(ETAG, etag.clone());
    // Revalidate every time: the ETag makes that a cheap 304, and a new deploy is seen at once.
    // Content-hashed assets never change under their name: no revalidation at all.
    h.insert(
        CACHE_CONTROL,
        HeaderValue::from_static(if immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if !not_modified {
        if let Ok(v) = HeaderValue::try_from(content_type) {
            h.insert(CONTENT_TYPE, v);
        }
        if *method == Method::HEAD {
            h.insert(
                http::header::CONTENT_LENGTH,
                HeaderValue::from(content.len()),
            );
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_decoding() {
        assert_eq!(decode_path("/").unwrap(), Vec::<String>::new());
        assert_eq!(decode_path("/a//b%20c.js").unwrap(), vec!["a", "b c.js"]);
        for bad in [
            "/../etc/passwd",
            "/a/%2e%2e/x",
            "/a/%2E%2E/x",
            "/a%2fb",
            "/a%5cb",
            "/a/./b",
            "/%00",
            "x",
        ] {
            assert!(decode_path(bad).is_err(), "{bad} accepted");
        }
        assert!(matches!(decode_path("/.env"), Err(ProxyError::NotFound)));
    }

    #[test]
    fn etag_matching() {
        let tag = etag_for(b"hello");
        let tag = tag.to_str().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            IF_NONE_MATCH,
            HeaderValue::try_from(format!("\"x\", W/{tag}")).unwrap(),
        );
        assert!(none_match(&h, tag));
        h.insert(IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!none_match(&h, tag));
    }
}

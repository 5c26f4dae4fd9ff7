//! The SPA's assets, served from the proxy's own origin (so the session cookie can be
//! `SameSite=Strict` and no CORS is needed).
//!
//! - Paths are decoded segment by segment; `.`/`..` segments, encoded slashes or backslashes,
//!   NUL bytes and hidden files (leading `.`) are refused, and the resolved file must lie under
//!   the canonical root (no symlink escapes).
//! - Strong `ETag` (SHA-256 of the content) with `If-None-Match` → 304, and `If-Match`
//!   (evaluated first) → 412 `precondition_failed` unless it lists that tag or `*`. No `Last-Modified`
//!   (so no `If-Modified-Since`): a file's modification time differs between the proxies of
//!   a fleet and after a redeploy of the same bytes, so it would make browsers and CDNs
//!   download again what the content's hash shows unchanged; and every answer carries an
//!   explicit `Cache-Control`, so no cache derives a heuristic lifetime from it either.
//! - One byte range (`Range: bytes=…`, with `If-Range`) of a GET → 206 from the bytes in
//!   memory; an unsatisfiable one → 416 `range_not_satisfiable`; several, a malformed one, or a
//!   suffix (`bytes=-5`) of an empty file → the whole file.
//! - A path whose last segment has no extension and matches no file is a client-side route:
//!   it gets `index.html`, except under `/.well-known/` (RFC 8615 resources, never routes).
//! - A folder with an `index.html` asked for without its trailing slash is redirected to it
//!   (301, `Cache-Control: no-cache`), so the page's relative references resolve inside the
//!   folder.
//! - Precompressed siblings (nginx `gzip_static`/`brotli_static`): when the request's
//!   `Accept-Encoding` allows `br` or `gzip` and the build put `app.js.br` or `app.js.gz` next
//!   to `app.js` (a regular file under the root, like any served file), those bytes are sent
//!   with `Content-Encoding`, the original's content type and their own ETag. Every response
//!   of a [`StaticDir`] carries `Vary: Accept-Encoding`. Nothing is compressed on the fly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT_ENCODING, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_RANGE,
    CONTENT_TYPE, ETAG, IF_MATCH, IF_NONE_MATCH, IF_RANGE, LOCATION, RANGE, VARY,
};
use http::{HeaderMap, Method, Response, StatusCode, Uri};
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
    /// Answers a GET or HEAD for `uri` (as received, percent-encoded).
    pub async fn serve(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if *method != Method::GET && *method != Method::HEAD {
            return Err(ProxyError::MethodNotAllowed { allow: "GET, HEAD" });
        }
        match self {
            Site::Dir(dir) => dir.serve(method, uri, headers).await,
            Site::Page(page) => page.serve(method, uri.path(), headers),
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
    /// `server.max_static_file` and `server.static_immutable` as they are now (a reload may
    /// change them: [`StaticDir::set_limits`]), shared by every event loop's copy; a request
    /// reads them once, with one `arc_swap` load.
    limits: Arc<arc_swap::ArcSwap<StaticLimits>>,
    cache: Arc<parking_lot::Mutex<FileCache>>,
}

/// The settings of a [`StaticDir`] a reload may change, besides the cache's size.
#[derive(Debug, Clone)]
pub struct StaticLimits {
    /// Largest file served (`server.max_static_file`).
    pub max_file_bytes: u64,
    /// Request path prefixes whose files are content-hashed (`server.static_immutable`).
    pub immutable_prefixes: Arc<[String]>,
}

/// Files read before, each kept while the file's size, modification time and [`Identity`] are
/// the ones it was read with (checked on every request: a new deploy is served at once), and
/// all of them within a byte budget. When a file does not fit, the least recently served ones
/// are dropped until it does (after a deploy, the old assets no page asks for any more go
/// first, and a file every page load asks for, `index.html`, stays); a file larger than the
/// whole budget is served without being kept.
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
    /// The file's [`Identity`] when it was looked up before the read.
    identity: Identity,
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

    /// The cached content of `found` if it was read with this size, modification time and
    /// [`Identity`] (and marks it used now).
    fn get(&mut self, found: &FoundFile) -> Option<CachedFile> {
        let now = self.next_use();
        let entry = self.entries.get_mut(&found.path).filter(|c| {
            c.len == found.len
                && c.modified.is_some()
                && c.modified == found.modified
                && c.identity == found.identity
        })?;
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

    /// Drops the least recently served entries until `len` more bytes fit the budget.
    fn make_room(&mut self, len: u64) {
        while self.bytes.saturating_add(len) > self.max_bytes {
            let Some((_, victim)) = self.by_use.pop_first() else {
                break;
            };
            if let Some(old) = self.entries.remove(&victim) {
                self.bytes -= old.len;
            }
        }
    }

    fn insert(&mut self, path: PathBuf, mut file: CachedFile) {
        self.remove(&path);
        // Without a modification time a change could not be seen: not kept.
        if file.len > self.max_bytes || file.modified.is_none() {
            return;
        }
        self.make_room(file.len);
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
            limits: Arc::new(arc_swap::ArcSwap::from_pointee(StaticLimits {
                max_file_bytes: DEFAULT_MAX_FILE_BYTES,
                immutable_prefixes: Arc::from([]),
            })),
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
    pub fn immutable_prefixes(self, prefixes: Vec<String>) -> Self {
        let limits = StaticLimits {
            immutable_prefixes: prefixes.into(),
            ..StaticLimits::clone(&self.limits.load())
        };
        self.limits.store(Arc::new(limits));
        self
    }

    /// Sets the largest file served (`server.max_static_file`). A bigger file is a deployment
    /// problem, not a missing file: it answers 500 `internal_error`, and the log names the
    /// file, its size and the key to raise.
    pub fn max_file_bytes(self, max: u64) -> Self {
        let limits = StaticLimits {
            max_file_bytes: max,
            ..StaticLimits::clone(&self.limits.load())
        };
        self.limits.store(Arc::new(limits));
        self
    }

    /// Applies a reload's `server.max_static_file`, `server.static_immutable` and
    /// `server.static_cache_size` on every event loop at once, for the requests that start
    /// from now on (one a request is serving keeps what it read). A smaller cache drops its
    /// least recently served files now; files cached before that are over a lowered
    /// `max_static_file` are no longer served (the size is checked on every request).
    pub fn set_limits(&self, limits: StaticLimits, max_cache_bytes: u64) {
        self.limits.store(Arc::new(limits));
        let mut cache = self.cache.lock();
        cache.max_bytes = max_cache_bytes;
        cache.make_room(0);
    }

    async fn serve(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let raw_path = uri.path();
        let segments = decode_path(raw_path)?;
        let limits = self.limits.load_full();
        let max = limits.max_file_bytes;
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
        // RFC 8615 names resources, not pages of the app: a missing one is a 404. Password
        // managers probe `/.well-known/change-password`, and first a name that must not exist,
        // to tell a server that answers 200 to everything.
        let well_known = segments.first().is_some_and(|first| first == ".well-known");
        let is_client_route = !well_known && segments.last().is_none_or(|last| !last.contains('.'));
        let (found, fallback) = match self.resolve(&root, candidate, max).await? {
            // A folder's page at a URL without the trailing slash: its relative references
            // (`style.css`) would resolve against the parent folder. Redirected as nginx and
            // serve-static do; the path passed the checks, so `Location` stays on this site.
            Some(found) if found.folder_index && !raw_path.ends_with('/') => {
                return redirect_to_folder(uri);
            }
            Some(found) => (found, false),
            None if is_client_route => (
                self.resolve(&root, root.join("index.html"), max)
                    .await?
                    .ok_or(ProxyError::NotFound)?,
                true,
            ),
            None => return Err(ProxyError::NotFound),
        };
        // Only the file asked for, never the `index.html` a client route falls back to.
        let immutable = !fallback
            && limits
                .immutable_prefixes
                .iter()
                .any(|prefix| raw_path.starts_with(prefix.as_str()));
        // The original's type, whichever representation is sent.
        let content_type = content_type_for(&found.named);
        let sibling = self.compressed_sibling(&root, &found, headers, max).await;
        let (file, encoding) = match sibling {
            // Gone since it was looked at: the plain file, as without a sibling.
            Some((encoding, sibling)) => match self.load(sibling, max).await {
                Ok(file) => (file, Some(encoding)),
                Err(_) => (self.load(found, max).await?, None),
            },
            None => (self.load(found, max).await?, None),
        };
        respond(
            method,
            headers,
            file.content,
            &file.etag,
            &Representation {
                content_type: &content_type,
                encoding: encoding.map(Encoding::token),
                immutable,
                vary: true,
            },
        )
    }

    /// The content and ETag of `found`, from the cache if it was read with this size and
    /// modification time (each representation is its own file, so its own entry).
    ///
    /// The read stops past `max` bytes: a file that grew over `server.max_static_file` since
    /// it was looked at is refused as one that was too large then, never read whole. A file
    /// gone since is a 404; any other read error (permissions, I/O) a 500 naming the file,
    /// so that a broken deploy is seen in the log rather than answered as a missing page.
    async fn load(&self, found: FoundFile, max: u64) -> Result<CachedFile, ProxyError> {
        use tokio::io::AsyncReadExt as _;

        let cached = self.cache.lock().get(&found);
        if let Some(file) = cached {
            return Ok(file);
        }
        let read_error = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => ProxyError::NotFound,
            _ => ProxyError::Internal(format!(
                "static file {} cannot be read: {e}",
                found.path.display()
            )),
        };
        let file = tokio::fs::File::open(&found.path)
            .await
            .map_err(read_error)?;
        // The size seen at the lookup (at most `max`), plus one byte to tell growth.
        let mut content = Vec::with_capacity(usize::try_from(found.len).unwrap_or(0));
        file.take(max.saturating_add(1))
            .read_to_end(&mut content)
            .await
            .map_err(read_error)?;
        if content.len() as u64 > max {
            return Err(ProxyError::Internal(format!(
                "static file {} grew over server.max_static_file ({max} bytes) while read",
                found.path.display()
            )));
        }
        let content = Bytes::from(content);
        let file = CachedFile {
            // What was read (the file may have changed since it was looked at: then
            // its size or time differ next time, and it is read again).
            len: content.len() as u64,
            modified: found.modified.filter(|_| content.len() as u64 == found.len),
            identity: found.identity,
            etag: etag_for(&content),
            content,
            used: 0,
        };
        self.cache.lock().insert(found.path, file.clone());
        Ok(file)
    }

    /// The precompressed sibling of `plain` (`app.js.br`, `app.js.gz`) in the most preferred
    /// encoding the request accepts that exists: a regular file under the root within the size
    /// limit. No lookup when the request accepts neither encoding or asks for a `.br`/`.gz` file
    /// itself (served as it is); otherwise one `lstat` per acceptable encoding, in a single
    /// blocking task, until one is found.
    async fn compressed_sibling(
        &self,
        root: &Path,
        plain: &FoundFile,
        headers: &HeaderMap,
        max: u64,
    ) -> Option<(Encoding, FoundFile)> {
        let already_compressed = plain
            .named
            .extension()
            .is_some_and(|ext| ext == "br" || ext == "gz");
        if already_compressed {
            return None;
        }
        let encodings = accepted_encodings(headers);
        if encodings.is_empty() {
            return None;
        }
        let root = root.to_owned();
        let plain = plain.named.clone();
        tokio::task::spawn_blocking(move || {
            encodings.into_iter().find_map(|encoding| {
                existing_sibling(&root, &plain, encoding, max).map(|found| (encoding, found))
            })
        })
        .await
        .ok()
        .flatten()
    }

    /// The canonical regular file for `candidate` (a directory means its `index.html`), if it
    /// exists under the root; an error when it exists but is over the size limit (so a
    /// too-large file is never mistaken for a client route and answered with `index.html`).
    async fn resolve(
        &self,
        root: &Path,
        candidate: PathBuf,
        max: u64,
    ) -> Result<Option<FoundFile>, ProxyError> {
        let Some(found) = existing_file(root, candidate).await? else {
            return Ok(None);
        };
        if found.len > max {
            return Err(ProxyError::Internal(format!(
                "static file {} is {} bytes, over server.max_static_file ({max} bytes)",
                found.path.display(),
                found.len,
            )));
        }
        Ok(Some(found))
    }
}

/// The canonical regular file for `candidate` (a directory means its `index.html`), if it
/// exists under `root` (canonical), with its size. Only a path that is not there (or cannot
/// name a file: a component too long, a file where a folder would be) is "missing"; any other
/// error of the lookup (a folder the proxy may not search, an I/O error, a symlink loop) is a
/// 500 naming the path, as a file that cannot be read is: answered as a 404 or with
/// `index.html`, a broken deploy would go unseen.
async fn existing_file(root: &Path, candidate: PathBuf) -> Result<Option<FoundFile>, ProxyError> {
    let mut path = match tokio::fs::canonicalize(&candidate).await {
        Ok(path) => path,
        Err(e) => return missing_or_error(&candidate, e),
    };
    if !path.starts_with(root) {
        tracing::warn!(
            path = &*candidate.to_string_lossy(),
            "static path resolves outside the root"
        );
        return Ok(None);
    }
    let mut meta = match tokio::fs::metadata(&path).await {
        Ok(meta) => meta,
        Err(e) => return missing_or_error(&path, e),
    };
    let folder_index = meta.is_dir();
    // A folder's file is named `index.html` in the canonical folder, whatever a symlink there
    // points to (`index.html -> blobs/3f2a1c`): the name that says the type and that its
    // precompressed copy is named after. Named by its target, `/` went out as
    // `application/octet-stream` (with `nosniff`, a download) and without its `.br`.
    let mut folder_file = None;
    if folder_index {
        let index = path.join("index.html");
        folder_file = Some(index.clone());
        path = match tokio::fs::canonicalize(&index).await {
            Ok(path) => path,
            Err(e) => return missing_or_error(&index, e),
        };
        if !path.starts_with(root) {
            return Ok(None);
        }
        meta = match tokio::fs::metadata(&path).await {
            Ok(meta) => meta,
            Err(e) => return missing_or_error(&path, e),
        };
    }
    if !meta.is_file() {
        return Ok(None);
    }
    let named = match folder_file {
        Some(index) => index,
        None => named_as_requested(root, &candidate, &path).await,
    };
    Ok(Some(FoundFile {
        path,
        named,
        len: meta.len(),
        modified: meta.modified().ok(),
        identity: Identity::of(&meta),
        folder_index,
    }))
}

/// The file under the name the request used, in its canonical folder: `canonical` itself
/// unless a symlink renamed it (`app.js -> blobs/3f2a1c`, a content-addressed build), where the
/// name asked for is the one that says the type, and the one a precompressed copy is named
/// after (`app.js.br` next to `app.js`). One more lookup, only for a renaming symlink.
async fn named_as_requested(root: &Path, candidate: &Path, canonical: &Path) -> PathBuf {
    if canonical.file_name() == candidate.file_name() {
        return canonical.to_owned();
    }
    let (Some(folder), Some(name)) = (candidate.parent(), candidate.file_name()) else {
        return canonical.to_owned();
    };
    match tokio::fs::canonicalize(folder).await {
        Ok(folder) if folder.starts_with(root) => folder.join(name),
        _ => canonical.to_owned(),
    }
}

/// A failed lookup of `path`: nothing there (`Ok(None)`), or an error naming it.
fn missing_or_error<T>(path: &Path, e: std::io::Error) -> Result<Option<T>, ProxyError> {
    use std::io::ErrorKind;
    // A name over the file system's limit (a long URL segment) cannot be there either.
    // (`ErrorKind::InvalidFilename` would say it, from Rust 1.87: above `rust-version`.)
    let name_too_long =
        rustix::io::Errno::from_io_error(&e) == Some(rustix::io::Errno::NAMETOOLONG);
    match e.kind() {
        ErrorKind::NotFound | ErrorKind::NotADirectory => Ok(None),
        _ if name_too_long => Ok(None),
        _ => Err(ProxyError::Internal(format!(
            "static path {} cannot be looked up: {e}",
            path.display()
        ))),
    }
}

/// `plain` (the name requested, in its canonical folder under the canonical `root`) with the
/// suffix of `encoding`, if that is a regular file under the root no larger than `max` bytes.
/// Its folder is the plain file's, canonical and under the root: only a symlink can lead
/// elsewhere, and one is followed only to a file under the root.
fn existing_sibling(root: &Path, plain: &Path, encoding: Encoding, max: u64) -> Option<FoundFile> {
    let mut name = plain.file_name()?.to_owned();
    name.push(encoding.suffix());
    let path = plain.with_file_name(name);
    // No sibling (the usual case): this one failing call.
    let link_meta = std::fs::symlink_metadata(&path).ok()?;
    let (path, meta) = if link_meta.file_type().is_symlink() {
        let target = std::fs::canonicalize(&path).ok()?;
        if !target.starts_with(root) {
            tracing::warn!(
                path = &*path.to_string_lossy(),
                "precompressed static file resolves outside the root"
            );
            return None;
        }
        let meta = std::fs::metadata(&target).ok()?;
        (target, meta)
    } else {
        (path, link_meta)
    };
    (meta.is_file() && meta.len() <= max).then(|| FoundFile {
        named: path.clone(),
        path,
        len: meta.len(),
        modified: meta.modified().ok(),
        identity: Identity::of(&meta),
        folder_index: false,
    })
}

/// A content coding of a precompressed sibling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Br,
    Gzip,
}

impl Encoding {
    /// Its `Content-Encoding` token.
    fn token(self) -> &'static str {
        match self {
            Encoding::Br => "br",
            Encoding::Gzip => "gzip",
        }
    }

    /// What a build tool appends to the file name.
    fn suffix(self) -> &'static str {
        match self {
            Encoding::Br => ".br",
            Encoding::Gzip => ".gz",
        }
    }
}

/// The encodings among `br` and `gzip` the request's `Accept-Encoding` (RFC 9110 §12.5.3)
/// allows, most preferred first: by weight, `br` first at equal weight. A coding is allowed
/// when listed (`x-gzip` counts as `gzip`) or matched by `*` with a weight above 0; a listed
/// weight overrides the wildcard's, and a coding listed more than once gets its lowest weight
/// (a `q=0` is never overruled). An element with a malformed weight is ignored. No header (or
/// an empty one): none, the plain file is sent.
fn accepted_encodings(headers: &HeaderMap) -> Vec<Encoding> {
    // Weights in thousandths: listed br, listed gzip, `*`.
    let (mut br, mut gzip, mut star) = (None::<u16>, None::<u16>, None::<u16>);
    let lower = |slot: &mut Option<u16>, q: u16| *slot = Some(slot.map_or(q, |old| old.min(q)));
    for value in headers.get_all(ACCEPT_ENCODING) {
        let Ok(list) = value.to_str() else { continue };
        for element in list.split(',') {
            let mut parts = element.split(';');
            let coding = parts.next().unwrap_or_default().trim();
            if coding.is_empty() {
                continue;
            }
            let mut q = Some(1000);
            for param in parts {
                let (name, value) = param.split_once('=').unwrap_or((param, ""));
                if name.trim().eq_ignore_ascii_case("q") {
                    q = q.and(parse_qvalue(value.trim()));
                }
            }
            let Some(q) = q else { continue };
            if coding.eq_ignore_ascii_case("br") {
                lower(&mut br, q);
            } else if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
                lower(&mut gzip, q);
            } else if coding == "*" {
                lower(&mut star, q);
            }
        }
    }
    let br = br.or(star).unwrap_or(0);
    let gzip = gzip.or(star).unwrap_or(0);
    let mut accepted = Vec::with_capacity(2);
    if br > 0 && br >= gzip {
        accepted.push(Encoding::Br);
    }
    if gzip > 0 {
        accepted.push(Encoding::Gzip);
    }
    if br > 0 && br < gzip {
        accepted.push(Encoding::Br);
    }
    accepted
}

/// An RFC 9110 `qvalue` (`0`, `0.5`, `1`, `1.000`, at most three decimals) in thousandths.
fn parse_qvalue(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let whole: u16 = match whole {
        "0" => 0,
        "1" => 1000,
        _ => return None,
    };
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = fraction
        .bytes()
        .zip([100, 10, 1])
        .map(|(digit, scale)| u16::from(digit - b'0') * scale)
        .sum::<u16>();
    let q = whole + thousandths;
    (q <= 1000).then_some(q)
}

/// A regular file under the root, as looked at for this request.
struct FoundFile {
    /// Canonical: what is read, and the cache's key.
    path: PathBuf,
    /// The name the request used, in its canonical folder (`path` unless a symlink renamed
    /// the file): it gives the content type and the precompressed siblings' names.
    named: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    identity: Identity,
    /// The `index.html` of the folder the request named.
    folder_index: bool,
}

/// What tells a file apart from another one of the same size and modification time at the
/// same path, for the cache: its device and inode (a deploy that writes a new file and
/// renames it over the old one: `rsync`, `tar -x`, `cp` to a temporary name) and its status
/// change time (any write in place: `cp -p`), which, unlike the modification time, no tool
/// can set back. Deploys often carry the build's modification times over (`rsync -a`,
/// `cp -p`, `tar -x`), and reproducible builds (`SOURCE_DATE_EPOCH`, Bazel's `pkg_tar`, Nix)
/// give every file of every release the same one, while a new `index.html` naming new hashed
/// bundles of the same length has the same size as the old: by size and modification time
/// alone the old page was served from memory, with its old ETag, until a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Identity {
    #[cfg(unix)]
    dev_ino: (u64, u64),
    #[cfg(unix)]
    changed: (i64, i64),
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt as _;
            Identity {
                dev_ino: (meta.dev(), meta.ino()),
                changed: (meta.ctime(), meta.ctime_nsec()),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = meta;
            Identity {}
        }
    }
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
        respond(
            method,
            headers,
            self.html.clone(),
            &self.etag,
            &Representation {
                content_type: "text/html; charset=utf-8",
                encoding: None,
                immutable: false,
                vary: false,
            },
        )
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

/// Strong comparison (RFC 9110 §13.1.1): `If-Match` holds if it is `*` or lists our tag
/// exactly (a weak `W/` tag never matches), on any of its lines. Only called when it is present.
fn if_match(headers: &HeaderMap, etag: &str) -> bool {
    headers.get_all(IF_MATCH).iter().any(|value| {
        value.to_str().is_ok_and(|list| {
            list.split(',')
                .map(str::trim)
                .any(|candidate| candidate == "*" || candidate == etag)
        })
    })
}

/// How the bytes of a response are described.
struct Representation<'a> {
    /// The original file's type (also when a compressed sibling is sent).
    content_type: &'a str,
    /// The `Content-Encoding` of a precompressed sibling.
    encoding: Option<&'static str>,
    /// `Cache-Control` for a content-hashed asset (`static_immutable`).
    immutable: bool,
    /// `Vary: Accept-Encoding`: the answer depends on it (any file of a [`StaticDir`]).
    vary: bool,
}

fn respond(
    method: &Method,
    headers: &HeaderMap,
    content: Bytes,
    etag: &HeaderValue,
    representation: &Representation<'_>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Representation {
        content_type,
        encoding,
        immutable,
        vary,
    } = *representation;
    let tag = etag.to_str().unwrap_or_default();
    // RFC 9110 §13.2.2: `If-Match` is evaluated first, and an origin server must not ignore it
    // (§13.1.1). A download resumed with `Range` and `If-Match` (the tag of what it holds)
    // after a deploy changed the file must not be given a part of the new content to splice
    // onto the old: 412 instead. (`If-Unmodified-Since` is ignored, as a recipient must when
    // the resource has no modification date, §13.1.4: no `Last-Modified` is sent.)
    // Both refusals answer one client's condition, not the file: `{"error":…}` answers
    // (error.rs), `no-store`, never the file's `Cache-Control` (an `immutable` 412 or 416
    // would be served for a year by a cache keying on the URL).
    if headers.contains_key(IF_MATCH) && !if_match(headers, tag) {
        return Err(ProxyError::PreconditionFailed);
    }
    let not_modified = none_match(headers, tag);
    // Ranges are defined for GET only (RFC 9110 §14.2: HEAD ignores them), and after
    // `If-None-Match` (§13.2.2): a 304 has no content to take a part of.
    let range = if !not_modified && *method == Method::GET {
        requested_range(headers, etag, content.len() as u64)
    } else {
        None
    };
    let (status, body) = match range {
        _ if not_modified => (StatusCode::NOT_MODIFIED, Bytes::new()),
        _ if *method == Method::HEAD => (StatusCode::OK, Bytes::new()),
        // Both ends are below the content's length, which came from a `usize`.
        Some(ByteRange::Part { first, last }) => (
            StatusCode::PARTIAL_CONTENT,
            content.slice(first as usize..=last as usize),
        ),
        Some(ByteRange::NotSatisfiable) => {
            return Err(ProxyError::RangeNotSatisfiable {
                length: content.len() as u64,
            });
        }
        None => (StatusCode::OK, content.clone()),
    };
    let mut response = Response::new(Either::Right(Full::new(body)));
    *response.status_mut() = status;
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
    // `X-Content-Type-Options: nosniff` and the other browser security headers are added to
    // every answer the proxy makes (server.rs, `server.response_headers`), 304s and 404s too.
    // Also on a 304 (RFC 9110 §15.4.5), so a cache keys the revalidated entry the same way.
    if vary {
        h.insert(VARY, HeaderValue::from_static("accept-encoding"));
    }
    // Safari and iOS play `<video>`/`<audio>` only from a server that says it serves ranges.
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    match range {
        _ if not_modified || *method == Method::HEAD => {}
        Some(ByteRange::Part { first, last }) => {
            let value = format!("bytes {first}-{last}/{}", content.len());
            if let Ok(v) = HeaderValue::try_from(value) {
                h.insert(CONTENT_RANGE, v);
            }
        }
        Some(ByteRange::NotSatisfiable) | None => {}
    }
    if !not_modified {
        if let Ok(v) = HeaderValue::try_from(content_type) {
            h.insert(CONTENT_TYPE, v);
        }
        if let Some(encoding) = encoding {
            h.insert(CONTENT_ENCODING, HeaderValue::from_static(encoding));
        }
        if *method == Method::HEAD {
            h.insert(
                http::header::CONTENT_LENGTH,
                HeaderValue::from(content.len()),
            );
        }
    }
    Ok(response)
}

/// 301 to the folder `uri` names: its path with the trailing slash, the same query. The path
/// passed `forward::check_path` (no `//`, no `\`), so the relative `Location` cannot leave the
/// site. `no-cache`, like every answer here: a 301 is heuristically cacheable (RFC 9110
/// §15.4.2) and browsers keep one without an explicit lifetime for as long as they like, so a
/// later deploy that makes `/docs` a file or drops the folder (a client route again) would not
/// be seen by a browser that followed the redirect once.
fn redirect_to_folder(uri: &Uri) -> Result<Response<ProxyBody>, ProxyError> {
    let mut location = format!("{}/", uri.path());
    if let Some(query) = uri.query() {
        location.push('?');
        location.push_str(query);
    }
    let location = HeaderValue::try_from(location).map_err(|_| ProxyError::NotFound)?;
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::MOVED_PERMANENTLY;
    let h = response.headers_mut();
    h.insert(LOCATION, location);
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

/// What a `Range` header asks of a representation of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteRange {
    /// Bytes `first..=last`, both within the content.
    Part { first: u64, last: u64 },
    /// No byte of it exists (416).
    NotSatisfiable,
}

/// The one byte range (RFC 9110 §14.1.2) the request's `Range` asks for, if it is to be served:
/// `None` (the whole representation, 200) without a `Range`, with several of them or several
/// ranges in one (§14.2 lets a server ignore the header; one range is what players and
/// download managers send), a unit other than `bytes`, a malformed spec, a non-zero suffix of
/// an empty representation (satisfiable, yet nothing a 206 could describe), or an `If-Range`
/// (§13.1.5) that is not our strong ETag exactly: a date cannot match (no `Last-Modified` is
/// sent), nor can a weak tag. A position too large for a `u64` counts as past the end.
fn requested_range(headers: &HeaderMap, etag: &HeaderValue, len: u64) -> Option<ByteRange> {
    let mut values = headers.get_all(RANGE).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let mut if_range = headers.get_all(IF_RANGE).iter().peekable();
    if if_range.peek().is_some()
        && !if_range.all(|v| {
            v.to_str()
                .is_ok_and(|tag| tag.trim().as_bytes() == etag.as_bytes())
        })
    {
        return None;
    }
    let (unit, set) = value.to_str().ok()?.trim().split_once('=')?;
    if !unit.eq_ignore_ascii_case("bytes") || set.contains(',') {
        return None;
    }
    let (first, last) = set.trim().split_once('-')?;
    if first.is_empty() {
        // A suffix: the last `n` bytes (all of them when `n` is larger).
        let n = parse_position(last)?;
        if n == 0 {
            return Some(ByteRange::NotSatisfiable);
        }
        // RFC 9110 §14.1.2: on a zero-length representation a suffix-range with a non-zero
        // length is the one satisfiable form, yet no `Content-Range` can name the nothing it
        // selects (§14.4 needs first-pos <= last-pos < complete-length). §14.2 lets a server
        // ignore `Range` when the representation has no content: the whole (empty) file, 200.
        if len == 0 {
            return None;
        }
        return Some(ByteRange::Part {
            first: len - n.min(len),
            last: len - 1,
        });
    }
    let first = parse_position(first)?;
    let last = if last.is_empty() {
        u64::MAX
    } else {
        parse_position(last)?
    };
    if last < first {
        return None;
    }
    if first >= len {
        return Some(ByteRange::NotSatisfiable);
    }
    Some(ByteRange::Part {
        first,
        last: last.min(len - 1),
    })
}

/// A range position: ASCII digits only (no sign, no spaces), saturating at `u64::MAX`.
fn parse_position(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.bytes().fold(0u64, |n, digit| {
        n.saturating_mul(10).saturating_add(u64::from(digit - b'0'))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `load`'s refusals: a file that grew past the limit after its lookup, one gone since,
    /// and a read that fails (a directory where the lookup saw a file).
    #[tokio::test]
    async fn load_refuses_growth_and_reports_read_errors() {
        let root =
            std::env::temp_dir().join(format!("countersign-static-load-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let path = root.join("app.js");
        std::fs::write(&path, b"0123456789").unwrap();
        let dir = StaticDir::new(&root).unwrap();
        let found = |path: &Path, len| FoundFile {
            path: path.to_owned(),
            named: path.to_owned(),
            len,
            modified: None,
            identity: Identity::default(),
            folder_index: false,
        };
        // Seen at 5 bytes with a 5-byte limit, 10 when read: refused, and not cached.
        match dir.load(found(&path, 5), 5).await {
            Err(ProxyError::Internal(message)) => {
                assert!(
                    message.contains("grew over server.max_static_file"),
                    "{message}"
                );
            }
            other => panic!("a grown file: {:?}", other.map(|f| f.len)),
        }
        assert_eq!(dir.cached_bytes(), 0);
        // Within the limit: read whole.
        let file = dir.load(found(&path, 10), 10).await.unwrap();
        assert_eq!(&file.content[..], b"0123456789");
        // Gone since the lookup: a 404.
        assert!(matches!(
            dir.load(found(&root.join("gone.js"), 3), 10).await,
            Err(ProxyError::NotFound)
        ));
        // A read error other than "gone": a 500 naming the file.
        match dir.load(found(&root, 3), 10).await {
            Err(ProxyError::Internal(message)) => {
                assert!(message.contains("cannot be read"), "{message}");
            }
            other => panic!("a failed read: {:?}", other.map(|f| f.len)),
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

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

    fn accepted(values: &[&str]) -> Vec<&'static str> {
        let mut h = HeaderMap::new();
        for value in values {
            h.append(ACCEPT_ENCODING, HeaderValue::try_from(*value).unwrap());
        }
        accepted_encodings(&h)
            .into_iter()
            .map(Encoding::token)
            .collect()
    }

    #[test]
    fn accept_encoding_parsing() {
        let none: &[&str] = &[];
        for (header, expected) in [
            // Browsers.
            ("gzip, deflate, br, zstd", &["br", "gzip"][..]),
            ("gzip, deflate", &["gzip"]),
            ("br", &["br"]),
            // Weights: the client's preference first, br first at equal weight.
            ("gzip;q=1.0, br;q=0.5", &["gzip", "br"]),
            ("br;q=0.5, gzip;q=0.5", &["br", "gzip"]),
            ("gzip; q=0.8 , br ;Q=0.9", &["br", "gzip"]),
            // q=0: not acceptable.
            ("br;q=0, gzip", &["gzip"]),
            ("br;q=0.000, gzip;q=0.", &[]),
            ("gzip;q=0", &[]),
            // A coding listed twice: its lowest weight.
            ("br, br;q=0", &[]),
            // Case-insensitive, x-gzip is gzip.
            ("BR, GZip", &["br", "gzip"]),
            ("x-gzip", &["gzip"]),
            // The wildcard, overridden by a listed coding.
            ("*", &["br", "gzip"]),
            ("*;q=0", &[]),
            ("*, br;q=0", &["gzip"]),
            ("*;q=0, gzip", &["gzip"]),
            ("*;q=0.2, br;q=0.1", &["gzip", "br"]),
            // Identity only, or nothing.
            ("identity", &[]),
            ("", &[]),
            (" , ,", &[]),
            // Not "br": another token that merely starts or ends like it.
            ("brotli, xgzip, gzip2", &[]),
            // A malformed weight: the element is ignored.
            ("br;q=2, gzip", &["gzip"]),
            ("br;q=1.5, gzip;q=abc", &[]),
            ("br;q=0.1234", &[]),
            ("br;q=, gzip;q=1.000", &["gzip"]),
            ("br;q=-1", &[]),
            ("br;q=1.001", &[]),
            ("br;q=.5", &[]),
        ] {
            assert_eq!(accepted(&[header]), expected, "{header:?}");
        }
        assert_eq!(accepted(none), none, "no header");
        // Several header lines are one list.
        assert_eq!(accepted(&["gzip", "br;q=0.5"]), ["gzip", "br"]);
        assert_eq!(accepted(&["br", "br;q=0"]), none);
    }

    #[test]
    fn byte_ranges() {
        let etag = HeaderValue::from_static("\"abc\"");
        let range = |value: &str, if_range: Option<&str>, len: u64| {
            let mut h = HeaderMap::new();
            h.insert(RANGE, HeaderValue::try_from(value).unwrap());
            if let Some(tag) = if_range {
                h.insert(IF_RANGE, HeaderValue::try_from(tag).unwrap());
            }
            requested_range(&h, &etag, len)
        };
        let part = |first, last| Some(ByteRange::Part { first, last });
        let unsatisfiable = Some(ByteRange::NotSatisfiable);
        for (value, len, expected) in [
            ("bytes=0-0", 10, part(0, 0)),
            ("bytes=0-", 10, part(0, 9)),
            ("bytes=9-100", 10, part(9, 9)),
            ("bytes=-1", 10, part(9, 9)),
            ("bytes=-10", 10, part(0, 9)),
            ("bytes=-11", 10, part(0, 9)),
            ("BYTES=2-3", 10, part(2, 3)),
            ("bytes=0-18446744073709551616", 10, part(0, 9)),
            ("bytes=10-", 10, unsatisfiable),
            ("bytes=18446744073709551616-", 10, unsatisfiable),
            ("bytes=-0", 10, unsatisfiable),
            ("bytes=0-", 0, unsatisfiable),
            ("bytes=-5", 0, None),
            ("bytes=-0", 0, unsatisfiable),
            ("bytes=3-2", 10, None),
            ("bytes=0-1,2-3", 10, None),
            ("bytes=", 10, None),
            ("bytes=-", 10, None),
            ("bytes=1", 10, None),
            ("bytes=-1-2", 10, None),
            ("bytes = 0-1", 10, None),
            ("bits=0-1", 10, None),
        ] {
            assert_eq!(range(value, None, len), expected, "{value} of {len}");
        }
        assert_eq!(range("bytes=0-1", Some("\"abc\""), 10), part(0, 1));
        assert_eq!(range("bytes=0-1", Some("W/\"abc\""), 10), None);
        assert_eq!(range("bytes=0-1", Some("\"abd\""), 10), None);
        assert_eq!(
            range("bytes=0-1", Some("Wed, 21 Oct 2015 07:28:00 GMT"), 10),
            None
        );
        assert_eq!(parse_position("007"), Some(7));
        assert_eq!(parse_position("+7"), None);
        assert_eq!(parse_position(""), None);
    }

    #[test]
    fn qvalues() {
        for (text, q) in [
            ("0", Some(0)),
            ("1", Some(1000)),
            ("1.", Some(1000)),
            ("1.000", Some(1000)),
            ("0.5", Some(500)),
            ("0.05", Some(50)),
            ("0.001", Some(1)),
            ("0.999", Some(999)),
            ("1.001", None),
            ("2", None),
            ("0.0001", None),
            ("", None),
            ("0.a", None),
            ("01", None),
        ] {
            assert_eq!(parse_qvalue(text), q, "{text:?}");
        }
    }
}

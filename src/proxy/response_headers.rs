//! Browser security headers (`server.response_headers`), as nginx's `add_header` would set
//! them in front of an SPA.
//!
//! The proxy serves the SPA's documents, so it is the server that must tell the browser how to
//! treat them. Defaults (docs/FRONTEND.md, "Security headers"):
//! - `X-Content-Type-Options: nosniff`: a file is only ever what its `Content-Type` says;
//! - `X-Frame-Options: DENY`: no other page can frame the logged-in app (clickjacking);
//! - `Referrer-Policy: strict-origin-when-cross-origin`: a cross-origin request learns the
//!   origin only, never the path and query of the app's URL (which can name records);
//! - `Strict-Transport-Security: max-age=31536000` when `server.public_origin` is https (one
//!   year, this host only: `includeSubDomains` and `preload` commit other hosts and are the
//!   operator's call).
//!
//! No `Content-Security-Policy` by default: a policy strict enough to matter depends on the
//! SPA's build (inline scripts, style hashes, API and asset hosts); the operator sets one.
//!
//! Where: every answer the proxy makes itself (static files including 304 and 404, `/auth/*`,
//! every error answer), replacing a header of the same name. Proxied API answers are left as
//! the upstream sent them unless `server.response_headers_on_upstream` is set, and then only
//! names the upstream did not send are added (the upstream knows its answers best). The set is
//! built once at start; a response costs one insert per header, no parsing or allocation.
//!
//! Live: a reload (SIGHUP, or a file change with `server.reload_check_interval`) that finds
//! these settings edited in a valid `proxy.toml` swaps in a new set for every event loop at
//! once ([`LiveResponseHeaders`]); an answer gets the old set or the new one, never a mix.

use std::cell::RefCell;
use std::sync::Arc;

use arc_swap::cache::Cache;
use arc_swap::ArcSwap;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response};
use http_body_util::Either;

use super::error::ProxyBody;

/// Marks an answer the upstream made that the proxy passes on in its own body type (see
/// [`ResponseHeaders::apply`]): the security headers treat it as the upstream's.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamAnswer;

/// The HSTS value sent by default over an https public origin: one year, this host only.
pub const DEFAULT_HSTS: &str = "max-age=31536000";

/// Default longest header value accepted (`server.max_response_header_value_bytes`; a
/// `Content-Security-Policy` with hashes can be long): a reverse proxy or CDN in front
/// typically refuses a response head over 4–8 KiB (nginx's `proxy_buffer_size` is one memory
/// page), which would turn every answer into a 502. An operator whose front accepts more may
/// raise it.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 4096;

/// Largest `server.max_response_header_value_bytes`: past this, no front end in common use
/// passes the answer on.
pub const MAX_VALUE_BYTES_LIMIT: usize = 64 * 1024;

/// The defaults, in the order they are sent: (name, value, https origins only).
const DEFAULTS: [(&str, &str, bool); 4] = [
    ("x-content-type-options", "nosniff", false),
    ("x-frame-options", "DENY", false),
    ("referrer-policy", "strict-origin-when-cross-origin", false),
    ("strict-transport-security", DEFAULT_HSTS, true),
];

/// What the operator changed (`[server.response_headers]`): headers set (added, or replacing a
/// default) and defaults removed (an empty value). Checked when built; [`ResponseHeaders`] is
/// the set sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHeaderRules {
    /// In the config's order; `None` removes the default of that name.
    changes: Vec<(HeaderName, Option<HeaderValue>)>,
    /// Also on proxied answers that lack the header (`server.response_headers_on_upstream`).
    on_upstream: bool,
    /// Longest value [`set`](Self::set) accepts (`server.max_response_header_value_bytes`).
    max_value_bytes: usize,
}

impl Default for ResponseHeaderRules {
    fn default() -> Self {
        ResponseHeaderRules {
            changes: Vec::new(),
            on_upstream: false,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

impl ResponseHeaderRules {
    /// The defaults, unchanged, on the proxy's own answers only.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` (as written in the config) to `value` (empty: removes the default), checked
    /// as [`check_header`] does. The error is the problem, without file or key.
    pub fn set(mut self, name: &str, value: &str, https: bool) -> Result<Self, String> {
        let (name, value) = check_header(name, value, https, self.max_value_bytes)?;
        if self.changes.iter().any(|(n, _)| *n == name) {
            return Err(format!(
                "{name:?} is set twice (header names are case-insensitive)"
            ));
        }
        self.changes.push((name, value));
        Ok(self)
    }

    /// Also adds the headers to proxied API answers that lack them.
    pub fn on_upstream(mut self, on: bool) -> Self {
        self.on_upstream = on;
        self
    }

    /// The longest value the later [`set`](Self::set)s accept (default
    /// [`DEFAULT_MAX_VALUE_BYTES`]).
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }
}

/// The headers sent, built once at start from the defaults and the operator's
/// [`ResponseHeaderRules`].
#[derive(Debug, Clone)]
pub struct ResponseHeaders {
    headers: Arc<[(HeaderName, HeaderValue)]>,
    on_upstream: bool,
}

impl ResponseHeaders {
    /// The defaults for this public origin's scheme, with `rules` applied (a set header
    /// replaces the default of its name in place; others follow in the config's order).
    pub fn build(rules: &ResponseHeaderRules, https: bool) -> Self {
        let mut headers: Vec<(HeaderName, HeaderValue)> = DEFAULTS
            .iter()
            .filter(|(_, _, https_only)| https || !https_only)
            .map(|&(name, value, _)| {
                (
                    HeaderName::from_static(name),
                    HeaderValue::from_static(value),
                )
            })
            .collect();
        for (name, value) in &rules.changes {
            let existing = headers.iter().position(|(n, _)| n == name);
            match (existing, value) {
                (Some(i), Some(value)) => headers[i].1 = value.clone(),
                (Some(i), None) => {
                    headers.remove(i);
                }
                (None, Some(value)) => headers.push((name.clone(), value.clone())),
                // Removing a default this origin does not get (HSTS over http): nothing to do.
                (None, None) => {}
            }
        }
        for (_, value) in &headers {
            // A value made from the config's text owns a buffer whose first clone converts it
            // to a shared one (an allocation): done here, so a response's clone only counts.
            drop(value.clone());
        }
        ResponseHeaders {
            headers: headers.into(),
            on_upstream: rules.on_upstream,
        }
    }

    /// The headers sent, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.headers.iter().map(|(n, v)| (n, v))
    }

    /// Adds the headers to `response`: to an answer the proxy made itself (its body is the
    /// proxy's, `Either::Right`, and it is not marked [`UpstreamAnswer`]: static files,
    /// `/auth/*`, every error answer), replacing any of
    /// the same name; to an upstream's answer (`Either::Left`) only with
    /// `response_headers_on_upstream`, and only the names it lacks. The proxied path's cost by
    /// default is this one branch.
    pub fn apply(&self, response: &mut Response<ProxyBody>) {
        // An upstream's answer re-framed by the proxy (a WebSocket handshake's refusal, read
        // whole, or its `101`) has the proxy's body type but is still the upstream's answer.
        let own = matches!(response.body(), Either::Right(_))
            && response.extensions().get::<UpstreamAnswer>().is_none();
        if own {
            self.insert(response.headers_mut());
        } else if self.on_upstream {
            let headers = response.headers_mut();
            for (name, value) in self.headers.iter() {
                headers.entry(name).or_insert_with(|| value.clone());
            }
        }
    }

    fn insert(&self, headers: &mut HeaderMap) {
        for (name, value) in self.headers.iter() {
            headers.insert(name, value.clone());
        }
    }

    /// The set the admin listener sends (`/healthz`, `/readyz`, `/metrics`, revoke): these
    /// headers without `Strict-Transport-Security`, since the admin listener is plain http
    /// (browsers ignore HSTS there, and it names the public origin's policy, not this port's).
    /// The rest applies as it does to any answer a browser might be pointed at: `nosniff` keeps
    /// a JSON or metrics text from being sniffed into HTML, `X-Frame-Options` and a configured
    /// CSP `frame-ancestors` keep it out of other pages' frames.
    pub fn for_admin(&self) -> ResponseHeaders {
        let headers: Vec<(HeaderName, HeaderValue)> = self
            .headers
            .iter()
            .filter(|(name, _)| *name != http::header::STRICT_TRANSPORT_SECURITY)
            .cloned()
            .collect();
        ResponseHeaders {
            headers: headers.into(),
            on_upstream: false,
        }
    }

    /// Adds the headers to an admin answer (every one is the proxy's own), replacing any of
    /// the same name. The names that can be configured never include `Content-Type`, so
    /// `/metrics` keeps its Prometheus text type.
    pub fn apply_to_admin(&self, response: &mut Response<ProxyBody>) {
        self.insert(response.headers_mut());
    }
}

/// The headers sent now, shared by every event loop of one proxy and swapped whole by a reload
/// ([`LiveResponseHeaders::replace`]): the public listener's set and the admin listener's
/// (the same without HSTS, [`ResponseHeaders::for_admin`]), in one value so that a reload
/// changes both at once and an answer is built from one version only.
///
/// Reading costs one relaxed atomic load per answer, no lock, no allocation, no reference
/// count: each thread keeps an [`arc_swap::cache::Cache`] of the current version, which only
/// compares the shared pointer with the one it holds, and takes the new version (a reference
/// count) the first time it sees a change. The cache is per thread, not per handle, because
/// the request path only has the shared state (`&`); it belongs to the handle it was made
/// from, and a thread serving another proxy's handle (tests start several in one process)
/// replaces it, so it is only ever a cache.
#[derive(Debug, Clone)]
pub struct LiveResponseHeaders {
    current: Arc<ArcSwap<HeaderSets>>,
}

/// One version of the headers sent (see [`LiveResponseHeaders`]).
#[derive(Debug)]
struct HeaderSets {
    public: ResponseHeaders,
    admin: ResponseHeaders,
}

impl HeaderSets {
    fn build(rules: &ResponseHeaderRules, https: bool) -> HeaderSets {
        let public = ResponseHeaders::build(rules, https);
        HeaderSets {
            admin: public.for_admin(),
            public,
        }
    }
}

type ThreadCache = Cache<Arc<ArcSwap<HeaderSets>>, Arc<HeaderSets>>;

thread_local! {
    /// This thread's view of the last [`LiveResponseHeaders`] it served from.
    static CURRENT_ON_THIS_THREAD: RefCell<Option<ThreadCache>> = const { RefCell::new(None) };
}

impl LiveResponseHeaders {
    /// The set of `rules` for a public origin of this scheme ([`ResponseHeaders::build`]).
    pub fn new(rules: &ResponseHeaderRules, https: bool) -> Self {
        LiveResponseHeaders {
            current: Arc::new(ArcSwap::from_pointee(HeaderSets::build(rules, https))),
        }
    }

    /// Sends the set of `rules` from now on, on every event loop sharing this handle. The new
    /// set is built completely before it is swapped in (one pointer store).
    pub fn replace(&self, rules: &ResponseHeaderRules, https: bool) {
        self.current
            .store(Arc::new(HeaderSets::build(rules, https)));
    }

    /// The public set sent now (a copy: for inspection, not for the request path).
    pub fn public(&self) -> ResponseHeaders {
        self.current.load().public.clone()
    }

    /// [`ResponseHeaders::apply`] with the current public set.
    pub fn apply(&self, response: &mut Response<ProxyBody>) {
        self.with_current(|sets| sets.public.apply(response));
    }

    /// [`ResponseHeaders::apply_to_admin`] with the current admin set.
    pub fn apply_to_admin(&self, response: &mut Response<ProxyBody>) {
        self.with_current(|sets| sets.admin.apply_to_admin(response));
    }

    /// Runs `f` once on the current version, read through this thread's cache. Without the
    /// cache (the thread is exiting, or `f` is already running on this thread: neither
    /// happens on the request path) the version is loaded from the shared pointer instead.
    fn with_current<R>(&self, mut f: impl FnMut(&HeaderSets) -> R) -> R {
        let cached = CURRENT_ON_THIS_THREAD.try_with(|slot| {
            let mut slot = slot.try_borrow_mut().ok()?;
            let ours =
                matches!(&*slot, Some(cache) if std::ptr::eq(cache.arc_swap(), &*self.current));
            if !ours {
                *slot = Some(Cache::new(Arc::clone(&self.current)));
            }
            let cache = slot.as_mut()?;
            Some(f(cache.load()))
        });
        match cached {
            Ok(Some(result)) => result,
            _ => f(&self.current.load()),
        }
    }
}

impl Default for ResponseHeaders {
    /// The defaults over an http origin (no HSTS), on the proxy's own answers only.
    fn default() -> Self {
        Self::build(&ResponseHeaderRules::new(), false)
    }
}

/// Why the proxy does not let `name` be configured, if it does not: headers that describe or
/// frame the message (the HTTP layer and the handlers set them per answer), carry or clear the
/// session, or would open the same-origin design to other origins.
fn forbidden(name: &HeaderName) -> Option<&'static str> {
    let text = name.as_str();
    let why = match text {
        "set-cookie" | "set-cookie2" => "cookies carry the session; only the proxy sets them",
        "clear-site-data" => "sent on every answer it would delete the session cookie",
        "content-length" | "content-type" | "content-encoding" | "content-range" | "etag"
        | "last-modified" | "vary" | "date" | "location" | "allow" | "retry-after"
        | "www-authenticate" | "proxy-authenticate" | "x-request-id" | "accept-ranges" => {
            "the proxy sets it per answer (it describes that answer)"
        }
        "cache-control" | "expires" | "pragma" | "age" => {
            "caching is set per answer: session answers must stay no-store, index.html \
             no-cache, hashed assets immutable"
        }
        _ if super::forward::is_hop_by_hop(name) => {
            "a hop-by-hop field, which describes one connection (RFC 9110 section 7.6.1)"
        }
        // The handshake's answer: the proxy's own 426 names the versions it speaks, and an
        // upstream's 101 names the protocol and extensions it chose (or none).
        _ if text.starts_with("sec-websocket-") => {
            "a WebSocket handshake field, which describes that handshake's answer"
        }
        _ if text.starts_with("access-control-") => {
            "CORS would let other origins read the proxy's answers (the SPA is served \
             same-origin and needs none)"
        }
        _ => return None,
    };
    Some(why)
}

/// Checks one `[server.response_headers]` entry: `name` a valid field name (case-insensitive,
/// `-` not `_`) that the proxy lets be configured, `value` visible ASCII (spaces and tabs
/// inside) of at most `max_value_bytes`, or empty to remove a default of that name. A few
/// well-known headers get their value checked too. The error is the problem, without file or
/// key.
pub fn check_header(
    name: &str,
    value: &str,
    https: bool,
    max_value_bytes: usize,
) -> Result<(HeaderName, Option<HeaderValue>), String> {
    let written = name;
    let name = name.trim();
    if name.contains('_') {
        return Err(format!(
            "{written:?}: header names use \"-\", not \"_\" (nginx drops such fields by \
             default; is a [server] key written below [server.response_headers]?)"
        ));
    }
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{written:?} is not a valid header name"))?;
    if let Some(why) = forbidden(&name) {
        return Err(format!("{written:?} cannot be set here: {why}"));
    }
    let value = value.trim();
    if value.is_empty() {
        if !DEFAULTS.iter().any(|(n, _, _)| *n == name.as_str()) {
            return Err(format!(
                "an empty value removes a default header, and {written:?} is not one (the \
                 defaults: X-Content-Type-Options, X-Frame-Options, Referrer-Policy, \
                 Strict-Transport-Security)"
            ));
        }
        return Ok((name, None));
    }
    if value.len() > max_value_bytes {
        return Err(format!(
            "the value is {} bytes, more than {max_value_bytes} (a proxy or CDN in front would \
             refuse the answers; server.max_response_header_value_bytes raises the limit if \
             yours takes more)",
            value.len()
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|&c| !(c.is_ascii_graphic() || c == ' ' || c == '\t'))
    {
        return Err(format!(
            "the value holds {bad:?}: only visible ASCII, spaces and tabs are allowed"
        ));
    }
    check_known_value(&name, value, https)?;
    let value = HeaderValue::from_str(value)
        .map_err(|_| format!("{value:?} is not a valid header value"))?;
    Ok((name, Some(value)))
}

/// The value rules of the headers whose values are few and easy to get wrong.
fn check_known_value(name: &HeaderName, value: &str, https: bool) -> Result<(), String> {
    match name.as_str() {
        "strict-transport-security" => {
            if !https {
                return Err("browsers ignore Strict-Transport-Security over http, and \
                            server.public_origin is http"
                    .into());
            }
            let max_age = value.split(';').find_map(|directive| {
                let (key, seconds) = directive.trim().split_once('=')?;
                key.trim()
                    .eq_ignore_ascii_case("max-age")
                    .then(|| seconds.trim().trim_matches('"'))
            });
            match max_age {
                Some(seconds)
                    if !seconds.is_empty() && seconds.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    Ok(())
                }
                _ => Err(format!(
                    "{value:?} has no max-age=<seconds> directive (e.g. \"{DEFAULT_HSTS}\")"
                )),
            }
        }
        "x-frame-options" => {
            if value.eq_ignore_ascii_case("DENY") || value.eq_ignore_ascii_case("SAMEORIGIN") {
                Ok(())
            } else {
                Err(format!(
                    "{value:?}: use DENY or SAMEORIGIN (ALLOW-FROM is obsolete; to allow \
                     given origins use Content-Security-Policy frame-ancestors)"
                ))
            }
        }
        "x-content-type-options" => {
            if value.eq_ignore_ascii_case("nosniff") {
                Ok(())
            } else {
                Err(format!("{value:?}: the only value is nosniff"))
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(rules: &ResponseHeaderRules, https: bool) -> Vec<(String, String)> {
        ResponseHeaders::build(rules, https)
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn defaults_and_changes() {
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(
            sent(&ResponseHeaderRules::new(), false),
            pairs(&[
                ("x-content-type-options", "nosniff"),
                ("x-frame-options", "DENY"),
                ("referrer-policy", "strict-origin-when-cross-origin"),
            ])
        );
        assert_eq!(sent(&ResponseHeaderRules::new(), true).len(), 4);
        let rules = ResponseHeaderRules::new()
            .set("X-Frame-Options", "SAMEORIGIN", true)
            .unwrap()
            .set("Referrer-Policy", "", true)
            .unwrap()
            .set("Content-Security-Policy", "default-src 'self'", true)
            .unwrap();
        assert_eq!(
            sent(&rules, true),
            pairs(&[
                ("x-content-type-options", "nosniff"),
                ("x-frame-options", "SAMEORIGIN"),
                ("strict-transport-security", DEFAULT_HSTS),
                ("content-security-policy", "default-src 'self'"),
            ])
        );
    }

    /// A replaced set is what every thread reads next (each through its own cache), the admin
    /// set with it; two handles used on one thread never answer for each other.
    #[test]
    fn live_headers_are_replaced_for_every_thread_and_kept_apart_per_handle() {
        let csp = |live: &LiveResponseHeaders| {
            let mut response = Response::new(ProxyBody::Right(Default::default()));
            live.apply(&mut response);
            let public = response.headers().get("content-security-policy").cloned();
            let mut response = Response::new(ProxyBody::Right(Default::default()));
            live.apply_to_admin(&mut response);
            let admin = response.headers().get("content-security-policy").cloned();
            assert_eq!(public, admin);
            public.map(|v| v.to_str().unwrap().to_owned())
        };
        let none = LiveResponseHeaders::new(&ResponseHeaderRules::new(), false);
        let other = LiveResponseHeaders::new(
            &ResponseHeaderRules::new()
                .set("Content-Security-Policy", "default-src 'none'", false)
                .unwrap(),
            false,
        );
        assert_eq!(csp(&none), None);
        assert_eq!(csp(&other).as_deref(), Some("default-src 'none'"));
        let shared = none.clone();
        let seen_before = std::thread::spawn(move || csp(&shared)).join().unwrap();
        assert_eq!(seen_before, None);
        none.replace(
            &ResponseHeaderRules::new()
                .set("Content-Security-Policy", "default-src 'self'", false)
                .unwrap(),
            false,
        );
        assert_eq!(csp(&none).as_deref(), Some("default-src 'self'"));
        let shared = none.clone();
        let seen_after = std::thread::spawn(move || csp(&shared)).join().unwrap();
        assert_eq!(seen_after.as_deref(), Some("default-src 'self'"));
        assert_eq!(csp(&other).as_deref(), Some("default-src 'none'"));
        assert_eq!(
            none.public().iter().count(),
            4,
            "three defaults over http and the CSP"
        );
    }

    #[test]
    fn refusals() {
        for (name, value, https, problem) in [
            ("X Frame", "DENY", false, "not a valid header name"),
            ("x_frame_options", "DENY", false, "not \"_\""),
            ("Set-Cookie", "a=b", false, "session"),
            ("Connection", "close", false, "hop-by-hop"),
            ("Transfer-Encoding", "chunked", false, "hop-by-hop"),
            ("Content-Length", "1", false, "per answer"),
            ("Cache-Control", "public", false, "caching"),
            ("Access-Control-Allow-Origin", "*", false, "CORS"),
            ("X-Custom", "", false, "not one"),
            ("X-Custom", "caf\u{e9}", false, "visible ASCII"),
            ("X-Custom", "a\u{1}b", false, "visible ASCII"),
            ("Strict-Transport-Security", "max-age=1", false, "over http"),
            ("Strict-Transport-Security", "preload", true, "max-age"),
            ("Strict-Transport-Security", "max-age=", true, "max-age"),
            (
                "X-Frame-Options",
                "ALLOW-FROM x",
                false,
                "DENY or SAMEORIGIN",
            ),
            ("X-Content-Type-Options", "sniff", false, "nosniff"),
        ] {
            let problem_seen =
                check_header(name, value, https, DEFAULT_MAX_VALUE_BYTES).unwrap_err();
            assert!(problem_seen.contains(problem), "{name}: {problem_seen}");
        }
        for max in [10, DEFAULT_MAX_VALUE_BYTES, MAX_VALUE_BYTES_LIMIT] {
            assert!(check_header("X-Custom", &"a".repeat(max + 1), false, max).is_err());
            assert!(check_header("X-Custom", &"a".repeat(max), false, max).is_ok());
        }
        let longer = ResponseHeaderRules::new().set("X-Custom", &"a".repeat(5000), false);
        assert!(longer.unwrap_err().contains("5000 bytes, more than 4096"));
        let raised = ResponseHeaderRules::new().max_value_bytes(5000).set(
            "X-Custom",
            &"a".repeat(5000),
            false,
        );
        assert!(raised.is_ok());
        // Removing HSTS over http removes nothing, and is no error (one file for both).
        assert!(check_header(
            "Strict-Transport-Security",
            "",
            false,
            DEFAULT_MAX_VALUE_BYTES
        )
        .is_ok());
        let twice = ResponseHeaderRules::new()
            .set("X-Custom", "a", false)
            .unwrap()
            .set("x-custom", "b", false)
            .unwrap_err();
        assert!(twice.contains("twice"), "{twice}");
    }
}

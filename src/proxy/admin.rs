//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and
//! `POST /admin/users/{name}/revoke`.
//!
//! It has no authentication of its own: bind it to loopback or a private interface
//! (`[admin] listen`), never to the public one. Its answers carry `[server.response_headers]`
//! without HSTS (plain http), and it refuses requests made by web pages: any whose `Host` is a
//! DNS name not in `admin.allowed_hosts` (a page that rebound its host name to the listener's
//! address, which could read the answers), revoke any with `Origin` or `Sec-Fetch-Site` (a
//! cross-site form POST from a browser that can reach it), the read-only endpoints those marked
//! `Sec-Fetch-Site: same-origin`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use parking_lot::Mutex;
use percent_encoding::percent_decode_str;

use super::error::{error_response, json_response, ProxyBody, ProxyError};
use super::server::ProxyState;
use crate::layer::PacedLog;

/// How readiness probes and reuses its answers (`admin.readiness_probe_timeout`,
/// `admin.readiness_cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadinessTiming {
    /// Time limit of one upstream TCP probe.
    pub probe_timeout: Duration,
    /// How long a readiness answer, and a round of upstream probes, is reused: probes more
    /// frequent than that cost no Redis round trip and no TCP connect.
    pub reuse_for: Duration,
}

impl Default for ReadinessTiming {
    fn default() -> Self {
        ReadinessTiming {
            probe_timeout: super::config::DEFAULT_READINESS_PROBE_TIMEOUT,
            reuse_for: super::config::DEFAULT_READINESS_CACHE,
        }
    }
}

/// One upstream as readiness sees it.
#[derive(Debug)]
pub struct UpstreamProbe {
    /// The upstream's name (`/readyz` body, logs).
    pub name: String,
    /// Its authority (logs).
    pub authority: Authority,
    /// The `host:port` its probe connects to.
    target: String,
    /// Whether `/readyz` fails while it is unreachable (`upstream[].required_for_ready`).
    pub required: bool,
}

impl UpstreamProbe {
    /// The probe of the upstream `name` at `scheme://authority`.
    pub fn new(name: String, scheme: &Scheme, authority: Authority, required: bool) -> Self {
        UpstreamProbe {
            name,
            target: probe_address(scheme, &authority),
            authority,
            required,
        }
    }
}

/// What one readiness check found.
#[derive(Debug, Clone)]
pub struct ReadinessReport {
    /// The session store answered and every upstream required for readiness accepted a
    /// TCP connection.
    pub ready: bool,
    /// The session store answered (its readiness check: PING, role, eviction policy).
    pub session_store: bool,
    /// Each upstream (in config order) accepted a TCP connection, required or not.
    pub upstream_up: Arc<[bool]>,
}

/// Cached readiness: the session store answers and every upstream required for readiness
/// accepts TCP connections. The other upstreams are probed too, and reported, but do not
/// make the proxy unready: their outage costs only their own routes.
///
/// One check at a time: requests that find the answer stale while a check is running wait for
/// that check and take its answer, rather than each starting one of their own. Without that,
/// every probe arriving during a check (up to the probe timeout with an upstream down, or the
/// Redis deadline) cost one more Redis round trip and one more TCP connect to every upstream:
/// a burst of probes, or one client sending many (HTTP/2 streams on the admin connections),
/// was multiplied onto Redis and the upstreams exactly while they were struggling.
#[derive(Debug)]
pub struct Readiness {
    upstreams: Vec<UpstreamProbe>,
    timing: ReadinessTiming,
    cached: Mutex<Option<(Instant, ReadinessReport)>>,
    /// Held while a readiness check runs (an async lock: its holder awaits the check).
    checking: tokio::sync::Mutex<()>,
    /// The upstream probes alone, for `/metrics` (which asks the store for its session count
    /// and should not cost it a readiness round trip too).
    cached_upstreams: Mutex<Option<(Instant, Arc<[bool]>)>>,
    /// Held while the upstreams are being probed.
    probing: tokio::sync::Mutex<()>,
}

/// The `host:port` a TCP probe of an upstream at `scheme://authority` connects to: the
/// authority's port, or the scheme's default one (443 for https, 80 otherwise).
pub fn probe_address(scheme: &Scheme, authority: &Authority) -> String {
    // `host()` keeps an IPv6 literal's brackets: `[::1]:443` is what a connect resolves.
    let port = authority
        .port_u16()
        .unwrap_or(if *scheme == Scheme::HTTPS { 443 } else { 80 });
    format!("{}:{port}", authority.host())
}

/// Whether something accepts a TCP connection at `target` within `timeout`.
async fn accepts_connections(target: &str, timeout: Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await,
        Ok(Ok(_))
    )
}

impl Readiness {
    /// Readiness over these upstreams (in config order).
    pub fn new(upstreams: Vec<UpstreamProbe>, timing: ReadinessTiming) -> Self {
        Readiness {
            upstreams,
            timing,
            cached: Mutex::new(None),
            checking: tokio::sync::Mutex::new(()),
            cached_upstreams: Mutex::new(None),
            probing: tokio::sync::Mutex::new(()),
        }
    }

    /// The upstreams, in config order.
    pub fn upstreams(&self) -> &[UpstreamProbe] {
        &self.upstreams
    }

    /// The session store and the upstreams, checked at once (answer reused for
    /// [`ReadinessTiming::reuse_for`]; one check at a time, the requests arriving meanwhile
    /// take its answer). The upstreams are probed for the check itself; its probes serve
    /// `/metrics` too ([`Readiness::upstream_states`]).
    pub async fn check(&self, state: &ProxyState) -> ReadinessReport {
        if let Some(report) = fresh(&self.cached, self.timing.reuse_for) {
            return report;
        }
        // Cancel-safe: a request dropped while it holds the lock releases it, and the next
        // one waiting checks.
        let _checking = self.checking.lock().await;
        // The check that held the lock may have just answered.
        if let Some(report) = fresh(&self.cached, self.timing.reuse_for) {
            return report;
        }
        // Upstreams probed for this check, not a `/metrics` scrape's probes reused: those may
        // be up to `reuse_for` old already, and this answer is reused for as long again
        // (an upstream back up stayed "down" here for up to twice the TTL).
        let (session_store, upstream_up) =
            tokio::join!(state.sessions.ready(), self.probe_upstreams());
        let ready = session_store
            && self
                .upstreams
                .iter()
                .zip(upstream_up.iter())
                .all(|(upstream, up)| *up || !upstream.required);
        let report = ReadinessReport {
            ready,
            session_store,
            upstream_up,
        };
        *self.cached.lock() = Some((Instant::now(), report.clone()));
        report
    }

    /// Whether each upstream accepts TCP connections (`/metrics`): all probed at once, so a
    /// check takes at most one probe timeout however many are down (the last probes, a
    /// readiness check's or this method's, reused for [`ReadinessTiming::reuse_for`]; one
    /// probe round at a time, as [`Readiness::check`]).
    pub async fn upstream_states(&self) -> Arc<[bool]> {
        if let Some(states) = fresh(&self.cached_upstreams, self.timing.reuse_for) {
            return states;
        }
        let _probing = self.probing.lock().await;
        if let Some(states) = fresh(&self.cached_upstreams, self.timing.reuse_for) {
            return states;
        }
        self.probe_upstreams().await
    }

    /// Probes every upstream now (all at once, each within the probe timeout), and keeps the
    /// answer for [`Readiness::upstream_states`].
    async fn probe_upstreams(&self) -> Arc<[bool]> {
        let states: Arc<[bool]> = futures_util::future::join_all(
            self.upstreams
                .iter()
                .map(|u| accepts_connections(&u.target, self.timing.probe_timeout)),
        )
        .await
        .into();
        for (upstream, up) in self.upstreams.iter().zip(states.iter()) {
            if !up {
                tracing::warn!(
                    upstream = %upstream.authority,
                    name = upstream.name.as_str(),
                    required_for_ready = upstream.required,
                    "readiness: upstream not reachable"
                );
            }
        }
        *self.cached_upstreams.lock() = Some((Instant::now(), states.clone()));
        states
    }
}

/// The cached answer, if younger than `reuse_for`.
fn fresh<T: Clone>(cache: &Mutex<Option<(Instant, T)>>, reuse_for: Duration) -> Option<T> {
    cache
        .lock()
        .as_ref()
        .filter(|(at, _)| at.elapsed() < reuse_for)
        .map(|(_, value)| value.clone())
}

/// One admin request.
pub async fn handle(state: Arc<ProxyState>, req: Request<Incoming>) -> Response<ProxyBody> {
    let mut response = match route(&state, &req).await {
        Ok(response) => response,
        Err(error) => error_response(&error),
    };
    // HEAD is GET without the body (probes and uptime monitors send it).
    if req.method() == Method::HEAD {
        super::error::strip_head_body(&mut response);
    }
    // `[server.response_headers]` without HSTS (this listener is plain http), on every admin
    // answer, errors included: an operator's browser may be pointed here.
    state.response_headers.apply_to_admin(&mut response);
    response
}

async fn route(
    state: &ProxyState,
    req: &Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    // `admin.allowed_hosts` now (live: a reload replaces it; none without a config file).
    refuse_foreign_hosts(req, &state.server_settings.admin_allowed_hosts())?;
    let path = req.uri().path();
    let method = req.method();
    match path {
        "/healthz" => {
            only_get(method)?;
            refuse_pages(req)?;
            Ok(json_response(
                StatusCode::OK,
                Bytes::from_static(b"{\"status\":\"ok\"}"),
            ))
        }
        "/readyz" => {
            only_get(method)?;
            refuse_pages(req)?;
            let report = state.readiness.check(state).await;
            let upstreams: serde_json::Map<String, serde_json::Value> = state
                .readiness
                .upstreams()
                .iter()
                .zip(report.upstream_up.iter())
                .map(|(upstream, up)| {
                    let entry = serde_json::json!({ "up": up, "required": upstream.required });
                    (upstream.name.clone(), entry)
                })
                .collect();
            let body = serde_json::json!({
                "ready": report.ready,
                "session_store": report.session_store,
                "upstreams": upstreams,
            });
            let status = if report.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            Ok(json_response(status, Bytes::from(body.to_string())))
        }
        "/metrics" => {
            only_get(method)?;
            refuse_pages(req)?;
            // Both bounded (the store's timeouts, the probe timeout), and waited for together.
            let (active, upstream_up) =
                tokio::join!(state.sessions.count(), state.readiness.upstream_states());
            let mut text = state.metrics.render(active.ok(), &upstream_up);
            render_websockets_open(&mut text, state.router.routes());
            state.server_settings.render_connections(&mut text);
            state.server_settings.body_memory.render(&mut text);
            state.server_settings.client_body_memory.render(&mut text);
            let mut response = Response::new(Either::Right(Full::new(Bytes::from(text))));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(response)
        }
        _ => {
            let name = path
                .strip_prefix("/admin/users/")
                .and_then(|rest| rest.strip_suffix("/revoke"))
                .ok_or(ProxyError::NotFound)?;
            only_post(method)?;
            refuse_browsers(req)?;
            let name = percent_decode_str(name)
                .decode_utf8()
                .map_err(|_| ProxyError::BadRequest("user name is not UTF-8".into()))?;
            if name.is_empty() {
                return Err(ProxyError::BadRequest("empty user name".into()));
            }
            let revoked = state.sessions.delete_user(&name).await?;
            tracing::info!(user = &*name, revoked, "admin: sessions revoked");
            let body = serde_json::json!({ "user": name, "revoked": revoked });
            Ok(json_response(StatusCode::OK, Bytes::from(body.to_string())))
        }
    }
}

/// DNS rebinding: a page on any site that a browser able to reach the listener opens can point
/// its own host name at the listener's private address, after which the browser takes the
/// listener for the page's origin and lets the page read `/metrics` and `/readyz` (upstream
/// names, session counts, which upstreams are down, the certificate's expiry). The browser
/// marks such a request with nothing but its `Host`: the listener is plain http, and a rebound
/// `http://name:port` origin is not potentially trustworthy, so Fetch Metadata (`Sec-Fetch-*`)
/// is not sent, nor is `Origin` on a GET. That `Host` is always the page's DNS name, since a
/// rebinding needs a name to re-resolve. So a request is answered only under an IP literal
/// (IPv4, bracketed IPv6; kubelet probes and Prometheus' pod discovery use the pod IP),
/// `localhost` (resolved by the browser's own machine, not by an attacker's DNS), or a name
/// the operator listed in `admin.allowed_hosts` (a Prometheus that scrapes through a Service),
/// each with any port. No `Host` or more than one, or another name in an absolute-form target
/// or HTTP/2 `:authority`, is refused too: which name the client used cannot be told.
///
/// Refused 403 `csrf`, the code of the other refusals of requests made by web pages: a new
/// reason code would also be a new `reason` label of `countersign_refusals_total`, a new value
/// in the clients' type definitions and in docs/FRONTEND.md, for a refusal that is the same
/// kind of thing (a page's request, refused before anything is done). The log line tells which.
fn refuse_foreign_hosts(req: &Request<Incoming>, allowed: &[String]) -> Result<(), ProxyError> {
    let mut hosts = req.headers().get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        warn_refused_host("(more than one Host)");
        return Err(ProxyError::Csrf("admin request with more than one Host"));
    }
    // HTTP/2 names the host in `:authority`, an HTTP/1.1 absolute-form target in the target:
    // hyper puts either in the URI, and each name given must be allowed.
    let authority = req.uri().authority().map(|a| a.as_str().as_bytes());
    let names: Vec<&[u8]> = host
        .map(HeaderValue::as_bytes)
        .into_iter()
        .chain(authority)
        .collect();
    if names.is_empty() {
        warn_refused_host("(no Host)");
        return Err(ProxyError::Csrf("admin request without Host"));
    }
    for name in names {
        if !host_allowed(name, allowed) {
            warn_refused_host(&String::from_utf8_lossy(&name[..name.len().min(256)]));
            return Err(ProxyError::Csrf(
                "admin request under a host name it does not answer to (admin.allowed_hosts)",
            ));
        }
    }
    Ok(())
}

/// Whether a `Host` (or authority) value is an IP literal, `localhost` or one of `allowed`
/// (in lower case, without trailing dot), with or without a port. Case is ignored, and so is a
/// fully qualified name's trailing dot. Anything that is not `host[:port]` is refused.
fn host_allowed(value: &[u8], allowed: &[String]) -> bool {
    let Ok(value) = std::str::from_utf8(value) else {
        return false;
    };
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => (None, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return false,
            },
        }
    } else {
        match value.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(value), None),
        }
    };
    // RFC 3986's `port = *DIGIT` (empty allowed), within the 16 bits a TCP port has.
    let port_ok = |port: &str| {
        port.bytes().all(|b| b.is_ascii_digit()) && (port.is_empty() || port.parse::<u16>().is_ok())
    };
    if port.is_some_and(|port| !port_ok(port)) {
        return false;
    }
    let Some(host) = host else {
        return true; // a bracketed IPv6 literal
    };
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && (name.eq_ignore_ascii_case("localhost")
            || allowed.iter().any(|a| a.eq_ignore_ascii_case(name)))
}

/// The warning about an admin request refused for its `Host`: at most one line every 10 s
/// (with the count not logged since), since a hostile page can send them in a loop; apart from
/// [`warn_refused_page`]'s, so that an operator whose scraper names the listener by a name not
/// listed sees the name and the key to list it in.
fn warn_refused_host(host: &str) {
    static PACING: PacedLog = PacedLog::new();
    if let Some(suppressed) = PACING.turn() {
        tracing::warn!(
            host,
            suppressed,
            "admin: request refused: its Host is not an IP address, localhost or a name in \
             admin.allowed_hosts (a web page that rebound its DNS name to this listener, or a \
             scraper or probe using a name not listed there)"
        );
    }
}

/// The read-only endpoints: GET, and HEAD (answered as GET without the body, in `handle`).
fn only_get(method: &Method) -> Result<(), ProxyError> {
    if method == Method::GET || method == Method::HEAD {
        Ok(())
    } else {
        Err(ProxyError::MethodNotAllowed { allow: "GET, HEAD" })
    }
}

/// The revoke endpoint changes state and has no authentication of its own (the listener must
/// be private), yet a web page open in a browser that can reach the listener (an operator's, on
/// the private network) could make it log users out: a cross-site form POST needs no CORS
/// preflight, and its answer need not be read to have its effect. Browsers mark every such
/// request (`Origin` on any POST from a page, `Sec-Fetch-*`); `curl`, scripts and orchestration
/// send neither. So a request with either is refused, 403 `csrf`, before anything is done.
fn refuse_browsers(req: &Request<Incoming>) -> Result<(), ProxyError> {
    let headers = req.headers();
    if headers.contains_key(http::header::ORIGIN) || headers.contains_key(SEC_FETCH_SITE) {
        warn_refused_page("revoke");
        return Err(ProxyError::Csrf(
            "admin revoke from a web page (Origin or Sec-Fetch-Site)",
        ));
    }
    Ok(())
}

/// `Sec-Fetch-Site`, which browsers add to requests to potentially trustworthy URLs (Fetch
/// Metadata): https, and http to loopback addresses and `localhost`.
const SEC_FETCH_SITE: &str = "sec-fetch-site";

/// The read-only endpoints answer no web page reading them as its own. Across origins a page
/// cannot read them (no CORS); after a DNS rebinding it could, which [`refuse_foreign_hosts`]
/// stops by the `Host` such a request carries: browsers send no Fetch Metadata to a rebound
/// plain-http origin, so this check alone never saw one. It stays as a second line: a request
/// marked `Sec-Fetch-Site: same-origin` is refused, 403 `csrf`, since no legitimate request
/// to this listener carries it (it serves no page that could make one), whatever name it came
/// under (an https front of the listener under an allowed name would have it sent). Served:
/// `none` (an address typed or bookmarked by an operator), `cross-site` and `same-site` (a
/// link followed from Prometheus' targets page or a dashboard; the page that linked cannot read
/// the answer), and scripts, probes and Prometheus, which send no such header.
fn refuse_pages(req: &Request<Incoming>) -> Result<(), ProxyError> {
    match req.headers().get(SEC_FETCH_SITE) {
        Some(site) if site.as_bytes().eq_ignore_ascii_case(b"same-origin") => {
            warn_refused_page("read");
            Err(ProxyError::Csrf(
                "admin request from a web page of its own origin (Sec-Fetch-Site: same-origin)",
            ))
        }
        _ => Ok(()),
    }
}

/// The warning about an admin request refused because a web page made it: at most one line
/// every 10 s (with the count of refusals not logged since), since a hostile page can send
/// them in a loop and the admin listener writes no access line that would pace it.
fn warn_refused_page(endpoint: &str) {
    static PACING: PacedLog = PacedLog::new();
    if let Some(suppressed) = PACING.turn() {
        tracing::warn!(
            endpoint,
            suppressed,
            "admin: request refused: it comes from a web page (Origin or Sec-Fetch-Site), not \
             a script"
        );
    }
}

/// The revoke endpoint changes state: POST only.
fn only_post(method: &Method) -> Result<(), ProxyError> {
    if method == Method::POST {
        Ok(())
    } else {
        Err(ProxyError::MethodNotAllowed { allow: "POST" })
    }
}

/// `countersign_websockets_open{upstream}`: the WebSockets open now on each route with
/// `websocket = true` (all event loops together); absent when no route has it.
fn render_websockets_open(out: &mut String, routes: &[super::forward::Route]) {
    use std::fmt::Write as _;
    let mut routes = routes
        .iter()
        .filter_map(|route| Some((route, route.websocket.as_ref()?)))
        .peekable();
    if routes.peek().is_none() {
        return;
    }
    out.push_str(
        "# HELP countersign_websockets_open WebSockets open now, by upstream \
         (websocket_max_open is the limit).\n",
    );
    out.push_str("# TYPE countersign_websockets_open gauge\n");
    for (route, websocket) in routes {
        let _ = writeln!(
            out,
            "countersign_websockets_open{{upstream=\"{}\"}} {}",
            super::metrics::escape_label(&route.name),
            websocket.open.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(url: &str) -> String {
        let uri: http::Uri = url.parse().expect("test URL");
        let scheme = uri.scheme().expect("scheme").clone();
        let authority = uri.authority().expect("authority").clone();
        probe_address(&scheme, &authority)
    }

    /// Without a port the probe uses the scheme's default one (an https upstream was probed
    /// on port 80); an explicit port is kept; IPv6 literals keep their brackets.
    #[test]
    fn probe_address_uses_the_scheme_default_port() {
        assert_eq!(probe("http://api.internal"), "api.internal:80");
        assert_eq!(probe("https://api.internal"), "api.internal:443");
        assert_eq!(probe("http://api.internal:8080"), "api.internal:8080");
        assert_eq!(probe("https://api.internal:8443"), "api.internal:8443");
        assert_eq!(probe("https://10.0.0.7:80"), "10.0.0.7:80");
        assert_eq!(probe("http://[::1]"), "[::1]:80");
        assert_eq!(probe("https://[::1]"), "[::1]:443");
        assert_eq!(probe("https://[fd00::7]:9443"), "[fd00::7]:9443");
        // What the probe connects to must parse as a socket address for literals.
        let _: std::net::SocketAddr = probe("https://[::1]").parse().expect("IPv6 address");
    }
}

//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and
//! `POST /admin/users/{name}/revoke`.
//!
//! It has no authentication of its own: bind it to loopback or a private interface
//! (`[admin] listen`), never to the public one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use parking_lot::Mutex;
use percent_encoding::percent_decode_str;

use super::error::{error_response, json_response, ProxyBody, ProxyError};
use super::server::ProxyState;

/// How long a readiness answer is reused (upstream probes are TCP connects).
pub const READINESS_TTL: Duration = Duration::from_secs(2);
/// Time limit of one upstream TCP probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Cached readiness: the session store answers and every upstream accepts TCP connections.
#[derive(Debug)]
pub struct Readiness {
    /// Each upstream's authority (for logs) and the `host:port` its probe connects to.
    upstreams: Vec<(Authority, String)>,
    cached: Mutex<Option<(Instant, bool)>>,
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

impl Readiness {
    /// Readiness over these upstreams (scheme and authority of each upstream URL).
    pub fn new(upstreams: Vec<(Scheme, Authority)>) -> Self {
        Readiness {
            upstreams: upstreams
                .into_iter()
                .map(|(scheme, authority)| {
                    let target = probe_address(&scheme, &authority);
                    (authority, target)
                })
                .collect(),
            cached: Mutex::new(None),
        }
    }

    async fn check(&self, state: &ProxyState) -> bool {
        if let Some((at, ready)) = *self.cached.lock() {
            if at.elapsed() < READINESS_TTL {
                return ready;
            }
        }
        let mut ready = state.sessions.ready().await;
        for (authority, target) in &self.upstreams {
            if !ready {
                break;
            }
            let probe = tokio::time::timeout(
                PROBE_TIMEOUT,
                tokio::net::TcpStream::connect(target.as_str()),
            )
            .await;
            if !matches!(probe, Ok(Ok(_))) {
                tracing::warn!(upstream = %authority, "readiness: upstream not reachable");
                ready = false;
            }
        }
        *self.cached.lock() = Some((Instant::now(), ready));
        ready
    }
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
    response
}

async fn route(
    state: &ProxyState,
    req: &Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let path = req.uri().path();
    let method = req.method();
    match path {
        "/healthz" => {
            only_get(method)?;
            Ok(json_response(
                StatusCode::OK,
                Bytes::from_static(b"{\"status\":\"ok\"}"),
            ))
        }
        "/readyz" => {
            only_get(method)?;
            let ready = state.readiness.check(state).await;
            let (status, body): (_, &'static [u8]) = if ready {
                (StatusCode::OK, b"{\"ready\":true}")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, b"{\"ready\":false}")
            };
            Ok(json_response(status, Bytes::from_static(body)))
        }
        "/metrics" => {
            only_get(method)?;
            let active = state.sessions.count().await.ok();
            let mut response = Response::new(Either::Right(Full::new(Bytes::from(
                state.metrics.render(active),
            ))));
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

/// The read-only endpoints: GET, and HEAD (answered as GET without the body, in `handle`).
fn only_get(method: &Method) -> Result<(), ProxyError> {
    if method == Method::GET || method == Method::HEAD {
        Ok(())
    } else {
        Err(ProxyError::MethodNotAllowed { allow: "GET, HEAD" })
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

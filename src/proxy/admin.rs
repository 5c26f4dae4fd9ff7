//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and
//! `POST /admin/users/{name}/revoke`.
//!
//! It has no authentication of its own: bind it to loopback or a private interface
//! (`[admin] listen`), never to the public one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::uri::Authority;
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
    upstreams: Vec<Authority>,
    cached: Mutex<Option<(Instant, bool)>>,
}

impl Readiness {
    /// Readiness over these upstream authorities.
    pub fn new(upstreams: Vec<Authority>) -> Self {
        Readiness {
            upstreams,
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
        for authority in &self.upstreams {
            if !ready {
                break;
            }
            let target = match authority.port_u16() {
                Some(_) => authority.as_str().to_owned(),
                None => format!("{}:80", authority.host()),
            };
            let probe =
                tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(target)).await;
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
    match route(&state, &req).await {
        Ok(response) => response,
        Err(error) => error_response(&error),
    }
}

async fn route(
    state: &ProxyState,
    req: &Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let path = req.uri().path();
    let method = req.method();
    match path {
        "/healthz" => {
            only(method, &Method::GET)?;
            Ok(json_response(
                StatusCode::OK,
                Bytes::from_static(b"{\"status\":\"ok\"}"),
            ))
        }
        "/readyz" => {
            only(method, &Method::GET)?;
            let ready = state.readiness.check(state).await;
            let (status, body): (_, &'static [u8]) = if ready {
                (StatusCode::OK, b"{\"ready\":true}")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, b"{\"ready\":false}")
            };
            Ok(json_response(status, Bytes::from_static(body)))
        }
        "/metrics" => {
            only(method, &Method::GET)?;
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
            only(method, &Method::POST)?;
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

fn only(method: &Method, allowed: &Method) -> Result<(), ProxyError> {
    if method == allowed {
        Ok(())
    } else if *allowed == Method::POST {
        Err(ProxyError::MethodNotAllowed { allow: "POST" })
    } else {
        Err(ProxyError::MethodNotAllowed { allow: "GET" })
    }
}

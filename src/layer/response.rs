//! The responses the layers answer with when they reject a request.

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::Full;

use crate::core::Reason;

/// Wire code for a request body that could not be read (the client broke off or sent invalid
/// chunked framing). Not a signature [`Reason`]: nothing was verified against it.
pub const BODY_READ_FAILED: &str = "body_read_failed";

/// The JSON body `{"error":"<code>"}` with its status: `code` is a stable wire code (ASCII
/// `a-z_`, so it needs no JSON escaping).
pub fn error_response(status: StatusCode, code: &str) -> Response<Full<Bytes>> {
    let body = format!("{{\"error\":\"{code}\"}}");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    // A rejection depends on this very request (its nonce, its time): never reuse it.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The rejection for a verification [`Reason`], with [`Reason::http_status`].
pub fn rejection(reason: Reason) -> Response<Full<Bytes>> {
    let status =
        StatusCode::from_u16(reason.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error_response(status, reason.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn every_reason_is_json_with_its_status() {
        for reason in Reason::ALL {
            let response = rejection(reason);
            assert_eq!(response.status().as_u16(), reason.http_status());
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, format!("{{\"error\":\"{}\"}}", reason.as_str()));
        }
    }
}

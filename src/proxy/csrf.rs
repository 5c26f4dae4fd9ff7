//! CSRF defences for state-changing requests.
//!
//! Two independent checks, both required where they apply:
//! - **Token**: `X-CSRF-Token` must equal the session's token (constant-time). A cross-site page
//!   can make the browser send the cookie, but it can neither read the token nor set a custom
//!   header without a CORS preflight that the proxy never grants.
//! - **Origin**: when the browser says where the request comes from (`Origin`,
//!   `Sec-Fetch-Site`), it must be the SPA's own origin. This also covers login, which has no
//!   session (and so no token) yet.

use http::{HeaderMap, Method};
use subtle::ConstantTimeEq as _;

use super::error::ProxyError;

/// The request header carrying the CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// Methods that must not change state and so need no CSRF check.
pub fn is_safe_method(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Checks `Origin` and `Sec-Fetch-Site` when present. `allowed` holds serialized origins
/// (`https://app.example.com`, no trailing slash, default port omitted): the public origin.
pub fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ProxyError> {
    let mut origins = headers.get_all(http::header::ORIGIN).iter();
    if let Some(origin) = origins.next() {
        if origins.next().is_some() {
            return Err(ProxyError::Csrf("more than one Origin header"));
        }
        // Scheme and host are case-insensitive; browsers send them lower-cased anyway.
        let same = origin
            .to_str()
            .is_ok_and(|o| allowed.iter().any(|a| o.eq_ignore_ascii_case(a)));
        if !same {
            return Err(ProxyError::Csrf("Origin is not the public origin"));
        }
    }
    let mut sites = headers.get_all("sec-fetch-site").iter();
    if let Some(site) = sites.next() {
        if sites.next().is_some() || site.as_bytes() != b"same-origin" {
            return Err(ProxyError::Csrf("Sec-Fetch-Site is not same-origin"));
        }
    }
    Ok(())
}

/// Checks that exactly one `X-CSRF-Token` header equals `session_token`, in constant time.
pub fn check_token(headers: &HeaderMap, session_token: &str) -> Result<(), ProxyError> {
    // `ct_eq` on slices of different lengths is false (and only leaks the length, which is
    // fixed and public).
    check_token_with(headers, |token| {
        bool::from(token.ct_eq(session_token.as_bytes())) && !session_token.is_empty()
    })
}

/// Checks that exactly one `X-CSRF-Token` header is there and that `matches` (a constant-time
/// comparison with the session's token) accepts its value.
pub fn check_token_with(
    headers: &HeaderMap,
    matches: impl FnOnce(&[u8]) -> bool,
) -> Result<(), ProxyError> {
    let mut tokens = headers.get_all(CSRF_HEADER).iter();
    let token = tokens
        .next()
        .ok_or(ProxyError::Csrf("missing X-CSRF-Token"))?;
    if tokens.next().is_some() {
        return Err(ProxyError::Csrf("more than one X-CSRF-Token header"));
    }
    if matches(token.as_bytes()) {
        Ok(())
    } else {
        Err(ProxyError::Csrf("X-CSRF-Token does not match the session"))
    }
}

/// Both checks, for a state-changing request of a session.
pub fn check_request(
    headers: &HeaderMap,
    session_token: &str,
    allowed_origins: &[String],
) -> Result<(), ProxyError> {
    check_origin(headers, allowed_origins)?;
    check_token(headers, session_token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn origin() -> Vec<String> {
        vec!["https://app.example.com".to_owned()]
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn origin_rules() {
        assert!(check_origin(&headers(&[]), &origin()).is_ok());
        assert!(check_origin(
            &headers(&[("origin", "https://app.example.com")]),
            &origin()
        )
        .is_ok());
        assert!(check_origin(
            &headers(&[("origin", "HTTPS://APP.example.com")]),
            &origin()
        )
        .is_ok());
        assert!(check_origin(&headers(&[("origin", "https://evil.example")]), &origin()).is_err());
        assert!(check_origin(&headers(&[("origin", "null")]), &origin()).is_err());
        assert!(
            check_origin(&headers(&[("origin", "http://app.example.com")]), &origin()).is_err()
        );
        assert!(check_origin(&headers(&[("sec-fetch-site", "same-origin")]), &origin()).is_ok());
        assert!(check_origin(&headers(&[("sec-fetch-site", "same-site")]), &origin()).is_err());
        assert!(check_origin(&headers(&[("sec-fetch-site", "cross-site")]), &origin()).is_err());
        assert!(check_origin(
            &headers(&[
                ("origin", "https://app.example.com"),
                ("origin", "https://evil.example")
            ]),
            &origin()
        )
        .is_err());
    }

    #[test]
    fn token_rules() {
        assert!(check_token(&headers(&[("x-csrf-token", "abc")]), "abc").is_ok());
        assert!(check_token(&headers(&[("x-csrf-token", "abd")]), "abc").is_err());
        assert!(check_token(&headers(&[("x-csrf-token", "ab")]), "abc").is_err());
        assert!(check_token(&headers(&[]), "abc").is_err());
        assert!(check_token(&headers(&[("x-csrf-token", "")]), "").is_err());
        assert!(check_token(
            &headers(&[("x-csrf-token", "abc"), ("x-csrf-token", "abc")]),
            "abc"
        )
        .is_err());
    }
}

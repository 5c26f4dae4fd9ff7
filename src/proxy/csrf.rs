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
///
/// `Origin: null` passes only beside `Sec-Fetch-Site: same-origin`: a page under
/// `Referrer-Policy: no-referrer` has the browser send `null` on its own same-origin writes
/// (Fetch, "append a request `Origin` header": the origin of a non-CORS request other than
/// GET and HEAD is serialized as `null` under that policy), and `Sec-Fetch-Site`, which no
/// page can set, still vouches for it. An opaque origin (a sandboxed frame, a `data:` page, a
/// cross-origin redirect) also sends `null`, but never `same-origin`, which needs a tuple
/// origin equal to the target's. Without `Sec-Fetch-Site` (older browsers) `null` stays
/// refused.
pub fn check_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ProxyError> {
    let same_origin_site = check_fetch_site(headers)?;
    match single_origin(headers)? {
        None => Ok(()),
        Some(origin) if is_allowed(origin, allowed) => Ok(()),
        Some(origin) if origin.as_bytes() == b"null" && same_origin_site => Ok(()),
        Some(_) => Err(ProxyError::Csrf("Origin is not the public origin")),
    }
}

/// The WebSocket handshake's rule: `Origin` present and equal to the public origin (a
/// browser always sends its real origin on a handshake, whatever the referrer policy), and
/// `Sec-Fetch-Site`, when present, `same-origin`.
pub fn check_named_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ProxyError> {
    check_fetch_site(headers)?;
    match single_origin(headers)? {
        Some(origin) if is_allowed(origin, allowed) => Ok(()),
        Some(_) => Err(ProxyError::Csrf("Origin is not the public origin")),
        None => Err(ProxyError::Csrf("no Origin")),
    }
}

/// For a read (GET, HEAD, OPTIONS) of a session route: an `Origin`, when present, must be the
/// public origin. Browsers send `Origin` on a GET only in a CORS request, i.e. from another
/// origin (the SPA's own reads and navigations carry none): a page on a sibling origin of the
/// same site gets the `SameSite=Strict` cookie sent with `fetch(url, {credentials:
/// "include"})`, and without this its read would reach the API signed as the user, with only
/// the API's CORS headers (passed through) between the answer and that page. `null` is
/// refused: under `no-referrer` a same-origin GET carries no `Origin` at all, so a `null` one
/// is an opaque origin's. `Sec-Fetch-Site` is not looked at: a link followed from another site
/// (`cross-site`, no cookie) or typed (`none`) is a navigation, not a forgery.
pub fn check_read_origin(headers: &HeaderMap, allowed: &[String]) -> Result<(), ProxyError> {
    match single_origin(headers)? {
        Some(origin) if !is_allowed(origin, allowed) => {
            Err(ProxyError::Csrf("a cross-origin read of a session route"))
        }
        _ => Ok(()),
    }
}

/// The request's one `Origin` header, if any; two are refused.
fn single_origin(headers: &HeaderMap) -> Result<Option<&http::HeaderValue>, ProxyError> {
    let mut origins = headers.get_all(http::header::ORIGIN).iter();
    let origin = origins.next();
    if origins.next().is_some() {
        return Err(ProxyError::Csrf("more than one Origin header"));
    }
    Ok(origin)
}

/// Whether `origin` is one of `allowed`. Scheme and host are case-insensitive; browsers send
/// them lower-cased anyway.
fn is_allowed(origin: &http::HeaderValue, allowed: &[String]) -> bool {
    origin
        .to_str()
        .is_ok_and(|o| allowed.iter().any(|a| o.eq_ignore_ascii_case(a)))
}

/// `Sec-Fetch-Site`, when present, must be one `same-origin`; returns whether it was there.
fn check_fetch_site(headers: &HeaderMap) -> Result<bool, ProxyError> {
    let mut sites = headers.get_all("sec-fetch-site").iter();
    match sites.next() {
        None => Ok(false),
        Some(site) if sites.next().is_none() && site.as_bytes() == b"same-origin" => Ok(true),
        Some(_) => Err(ProxyError::Csrf("Sec-Fetch-Site is not same-origin")),
    }
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

/// Where a redirect in an upstream's answer would take the browser, when that is another
/// origin than the allowed ones (`allowed[0]` is the public origin, which a relative
/// `Location` is resolved against), serialized (`https://elsewhere.example`, or `null` for
/// one with no origin, e.g. `data:`); None when the answer is not such a redirect.
///
/// Why: `fetch` and `XMLHttpRequest` follow 301, 302, 303, 307 and 308 on their own with the
/// request's headers (XHR cannot refuse to), so a write that carried `X-CSRF-Token` and got
/// one of these to another origin would take the token there, after a CORS preflight that
/// origin approves (an attacker's would): an open redirect in an API would hand out the
/// token. `Location` is read as a browser reads it (WHATWG URL: `/\evil.example` and
/// `/\t/evil.example` lead to `evil.example`); one that is not text, does not parse, or is
/// repeated counts as leaving (it cannot be told where it leads).
pub fn redirect_leaves_origin(
    status: http::StatusCode,
    headers: &HeaderMap,
    allowed: &[String],
) -> Option<String> {
    if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let mut locations = headers.get_all(http::header::LOCATION).iter();
    let location = locations.next()?;
    let unknown = || Some("(a Location that cannot be read)".to_owned());
    if locations.next().is_some() {
        return unknown();
    }
    let (Ok(location), Some(public)) = (location.to_str(), allowed.first()) else {
        return unknown();
    };
    let Ok(target) = url::Url::parse(public).and_then(|base| base.join(location)) else {
        return unknown();
    };
    let origin = target.origin().ascii_serialization();
    (!allowed.iter().any(|a| a.eq_ignore_ascii_case(&origin))).then_some(origin)
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

    /// `Origin: null` is a same-origin page under `Referrer-Policy: no-referrer` only when
    /// the browser also says `same-origin`; anything else with it stays refused.
    #[test]
    fn null_origin_rules() {
        let same = ("sec-fetch-site", "same-origin");
        assert!(check_origin(&headers(&[("origin", "null"), same]), &origin()).is_ok());
        assert!(check_origin(&headers(&[("origin", "null")]), &origin()).is_err());
        for site in ["same-site", "cross-site", "none", "Same-Origin"] {
            assert!(check_origin(
                &headers(&[("origin", "null"), ("sec-fetch-site", site)]),
                &origin()
            )
            .is_err());
        }
        assert!(check_origin(
            &headers(&[("origin", "null"), ("origin", "null"), same]),
            &origin()
        )
        .is_err());
        assert!(check_origin(&headers(&[("origin", "NULL"), same]), &origin()).is_err());
        assert!(check_origin(
            &headers(&[("origin", "null"), same, ("sec-fetch-site", "same-origin")]),
            &origin()
        )
        .is_err());
    }

    #[test]
    fn named_origin_rules() {
        let ours = ("origin", "https://app.example.com");
        assert!(check_named_origin(&headers(&[ours]), &origin()).is_ok());
        assert!(check_named_origin(
            &headers(&[ours, ("sec-fetch-site", "same-origin")]),
            &origin()
        )
        .is_ok());
        assert!(check_named_origin(&headers(&[]), &origin()).is_err());
        assert!(
            check_named_origin(&headers(&[("sec-fetch-site", "same-origin")]), &origin()).is_err()
        );
        assert!(check_named_origin(
            &headers(&[("origin", "null"), ("sec-fetch-site", "same-origin")]),
            &origin()
        )
        .is_err());
        assert!(check_named_origin(
            &headers(&[ours, ("sec-fetch-site", "cross-site")]),
            &origin()
        )
        .is_err());
    }

    #[test]
    fn read_origin_rules() {
        assert!(check_read_origin(&headers(&[]), &origin()).is_ok());
        assert!(check_read_origin(
            &headers(&[("origin", "https://app.example.com")]),
            &origin()
        )
        .is_ok());
        // Navigations from elsewhere carry no Origin on a GET.
        assert!(
            check_read_origin(&headers(&[("sec-fetch-site", "cross-site")]), &origin()).is_ok()
        );
        for foreign in [
            "https://evil.example",
            "https://sub.app.example.com",
            "null",
            "",
        ] {
            assert!(check_read_origin(&headers(&[("origin", foreign)]), &origin()).is_err());
        }
        assert!(check_read_origin(
            &headers(&[
                ("origin", "https://app.example.com"),
                ("origin", "https://app.example.com")
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

    /// Redirects a browser follows on its own, read as it reads them: only those that leave
    /// the public origin are named, with where they go.
    #[test]
    fn redirects_leaving_the_public_origin_are_named() {
        use http::StatusCode;
        let allowed = vec!["https://app.example.com".to_owned()];
        let answer = |status: u16, locations: &[&[u8]]| {
            let mut headers = HeaderMap::new();
            for location in locations {
                headers.append(
                    http::header::LOCATION,
                    http::HeaderValue::from_bytes(location).unwrap(),
                );
            }
            redirect_leaves_origin(StatusCode::from_u16(status).unwrap(), &headers, &allowed)
        };
        for status in [301, 302, 303, 307, 308] {
            assert_eq!(
                answer(status, &[b"https://evil.example/x?t=1"]).as_deref(),
                Some("https://evil.example"),
                "{status}"
            );
            assert_eq!(answer(status, &[b"/api/next"]), None, "{status}");
        }
        // Not followed by a browser, or nothing to follow.
        for status in [200, 201, 300, 304, 400] {
            assert_eq!(
                answer(status, &[b"https://evil.example/"]),
                None,
                "{status}"
            );
        }
        assert_eq!(answer(302, &[]), None);
        // Same origin, however spelled.
        for same in [
            &b"https://APP.example.com:443/x"[..],
            b"next",
            b"../up",
            b"?page=2",
            b"#top",
        ] {
            assert_eq!(answer(302, &[same]), None, "{same:?}");
        }
        // Another origin, however spelled: what a browser's URL parser makes of it.
        for (elsewhere, origin) in [
            (&b"//evil.example/x"[..], "https://evil.example"),
            (b"/\\evil.example/x", "https://evil.example"),
            (b"\\\\evil.example", "https://evil.example"),
            (b"/\t/evil.example", "https://evil.example"),
            (b"http://app.example.com/x", "http://app.example.com"),
            (
                b"https://app.example.com:8443/",
                "https://app.example.com:8443",
            ),
            (
                b"https://app.example.com.evil.example/",
                "https://app.example.com.evil.example",
            ),
            (b"data:text/html,hi", "null"),
            (b"javascript:alert(1)", "null"),
        ] {
            assert_eq!(
                answer(307, &[elsewhere]).as_deref(),
                Some(origin),
                "{elsewhere:?}"
            );
        }
        // Cannot be told where it leads: counted as leaving.
        let unknown = Some("(a Location that cannot be read)".to_owned());
        assert_eq!(answer(302, &[b"/a", b"/b"]), unknown);
        assert_eq!(answer(302, &[b"\xff/x"]), unknown);
        assert_eq!(answer(302, &[b"https://exa mple.com/"]), unknown);
    }
}

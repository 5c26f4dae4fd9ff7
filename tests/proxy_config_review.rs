//! Review fixes in the proxy config (src/proxy/config.rs):
//!
//! 1. An upstream `url` or `auth.verify_url` written with its scheme's default port
//!    (`https://api.internal:443`) is read without it. The signer signs the absolute URI's
//!    authority normalised (default port dropped, docs/PROTOCOL.md §3.1) but the proxy sends
//!    the configured authority as `Host`; a verifier with the default `Policy` reads an
//!    origin-form request as `http`, keeps `:443`, and refused every request (`bad_signature`).
//! 2. `server.client_address_header` names a field the proxy removes from every request on
//!    arrival: a field the proxy or the API relies on (`origin`, `cookie`, the CSRF token, the
//!    identity and signature fields, ...) is refused at load.
//!
//! Run: `cargo test --all-features --test proxy_config_review`.
#![cfg(feature = "proxy")]

mod support_cli;
mod support_tmp;

use std::path::{Path, PathBuf};

use countersign::proxy::config::{ConfigError, ProxyConfig};
use countersign::{Keyring, KeyringHandle, Nonce, Policy, Secret, Signer, SignerConfig, Verifier};
use http::request::Parts;
use http::{Request, Uri};
use support_tmp::TestDir;

const NOW: u64 = 1_700_000_000;

const KEYS: &str = r#"
active = "k1"
[[keys]]
id = "k1"
secret = "h59GLzUrs3uWiUgd7VLeMk5ILui23cAztIiaCFYN708="
"#;

/// A config checking logins at `verify_url` (so no users file is needed), with `server_extra`
/// appended to `[server]`, `signing_extra` to `[signing]`, and one upstream at `url`.
fn config(verify_url: &str, url: &str, server_extra: &str, signing_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:8080\"\npublic_origin = \"http://localhost:8080\"\n\
         {server_extra}\n\
         [auth]\nverify_url = \"{verify_url}\"\n\n\
         [signing]\nkeyring = \"keys.toml\"\n{signing_extra}\n\
         [[upstream]]\nname = \"api\"\nprefix = \"/api/\"\nurl = \"{url}\"\n"
    )
}

fn parse(text: &str) -> Result<ProxyConfig, ConfigError> {
    ProxyConfig::parse(text, Path::new("/etc/countersign/proxy.toml"))
}

// ---------------------------------------------------------------------------------------------
// 1. Default ports in upstream and verify URLs

/// The authority a parsed URL carries: what the proxy sends as `Host`, signs as `@authority`,
/// pools connections by and logs.
fn authority(uri: &Uri) -> &str {
    uri.authority().unwrap().as_str()
}

#[test]
fn an_upstream_url_with_its_schemes_default_port_is_read_without_it() {
    for (written, read) in [
        ("https://api.internal:443", "api.internal"),
        ("http://api.internal:80", "api.internal"),
        ("https://api.internal", "api.internal"),
        ("https://[::1]:443", "[::1]"),
        ("http://127.0.0.1:80/", "127.0.0.1"),
        // Another port stays, also the other scheme's default.
        ("https://api.internal:8443", "api.internal:8443"),
        ("http://api.internal:443", "api.internal:443"),
        ("https://api.internal:80", "api.internal:80"),
        ("http://127.0.0.1:3000", "127.0.0.1:3000"),
        // The port as a number.
        ("https://api.internal:0443", "api.internal"),
        ("http://api.internal:08080", "api.internal:8080"),
        // The host in lower case, as the signer's `@authority` reads it.
        ("https://API.Internal:443", "api.internal"),
        ("http://Api.Internal:8080", "api.internal:8080"),
    ] {
        let c = parse(&config("http://127.0.0.1:3000/verify", written, "", ""))
            .unwrap_or_else(|e| panic!("{written}: {e}"));
        let url = &c.upstreams[0].url;
        assert_eq!(authority(url), read, "{written}");
        let scheme = written.split_once("://").unwrap().0;
        assert_eq!(url.scheme_str(), Some(scheme), "{written}");
    }
}

#[test]
fn a_verify_url_with_its_schemes_default_port_is_read_without_it() {
    for (written, read, path_and_query) in [
        ("https://h:443/verify", "h", "/verify"),
        ("http://h:80/auth/verify?x=1", "h", "/auth/verify?x=1"),
        ("https://H.Internal:443/verify", "h.internal", "/verify"),
        ("https://h:8443/verify", "h:8443", "/verify"),
        ("http://h:443/verify", "h:443", "/verify"),
    ] {
        let c = parse(&config(written, "http://127.0.0.1:3000", "", ""))
            .unwrap_or_else(|e| panic!("{written}: {e}"));
        let url = c.auth.verify_url.as_ref().unwrap();
        assert_eq!(authority(url), read, "{written}");
        assert_eq!(
            url.path_and_query().map(|pq| pq.as_str()),
            Some(path_and_query),
            "{written}"
        );
    }
}

fn keyring() -> KeyringHandle {
    Keyring::single("k1", Secret::new(vec![9; 32]).unwrap())
        .unwrap()
        .into()
}

/// A request to `url` (the config's parsed upstream or verify URL) as the proxy builds it
/// (src/proxy/forward.rs): the absolute URI over the URL's scheme and authority, and `Host`
/// the authority as the config holds it; signed there, then received by an HTTP/1.1 server in
/// origin-form (its path and query, the `Host` kept).
fn signed_and_received(url: &Uri, path: &str) -> Parts {
    let authority = authority(url);
    let absolute = format!("{}://{authority}{path}", url.scheme_str().unwrap());
    let (mut parts, ()) = Request::post(absolute)
        .header(http::header::HOST, authority)
        .body(())
        .unwrap()
        .into_parts();
    Signer::new(keyring(), SignerConfig::default())
        .sign(
            &mut parts,
            b"{}",
            None,
            NOW,
            &Nonce::new("AAAAAAAAAAAAAAAAAAAAAA").unwrap(),
        )
        .unwrap();
    parts.uri = path.parse().unwrap();
    parts
}

/// End to end through the library (no proxy: the upstream would need port 443 or 80): what the
/// proxy signs for such a URL verifies at an API with the default `Policy` (no scheme
/// configured: an origin-form request reads as `http`).
#[test]
fn requests_to_a_default_port_url_verify_with_the_default_policy() {
    let verifier = Verifier::new(keyring(), Policy::default());
    for url in [
        "https://api.internal:443",
        "http://api.internal:80",
        "https://API.internal:443",
    ] {
        let c = parse(&config("https://auth.internal:443/verify", url, "", "")).unwrap();
        let received = signed_and_received(&c.upstreams[0].url, "/api/orders?page=2");
        verifier
            .verify(&received, b"{}", NOW)
            .unwrap_or_else(|e| panic!("upstream {url}: {e}"));
        let received = signed_and_received(c.auth.verify_url.as_ref().unwrap(), "/verify");
        verifier
            .verify(&received, b"{}", NOW)
            .unwrap_or_else(|e| panic!("verify_url of {url}: {e}"));
    }
}

// ---------------------------------------------------------------------------------------------
// 2. client_address_header

const TRUSTED: &str = "trusted_proxies = [\"10.0.0.0/8\"]\n";

fn with_header(header: &str, signing_extra: &str) -> String {
    config(
        "http://127.0.0.1:3000/verify",
        "http://127.0.0.1:3000",
        &format!("{TRUSTED}client_address_header = \"{header}\"\n"),
        signing_extra,
    )
}

fn assert_refused(text: &str, header: &str) {
    let err = parse(text).expect_err(&format!("{header} should be refused"));
    assert_eq!(err.key(), "server.client_address_header", "{header}: {err}");
    assert_eq!(
        err.file(),
        Path::new("/etc/countersign/proxy.toml"),
        "{err}"
    );
    assert!(err.problem().contains(header), "{header}: {err}");
    let shown = err.to_string();
    assert!(
        shown.starts_with("/etc/countersign/proxy.toml: server.client_address_header: "),
        "{shown}"
    );
}

#[test]
fn client_address_header_refuses_fields_the_proxy_relies_on() {
    for header in [
        "origin",
        "Origin",
        "sec-fetch-site",
        "sec-fetch-mode",
        "cookie",
        "x-csrf-token",
        "host",
        "content-type",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "x-auth-user",
        "x-auth-roles",
        "signature",
        "signature-input",
        "content-digest",
        "authorization",
        "sec-websocket-key",
        "sec-websocket-protocol",
    ] {
        assert_refused(&with_header(header, ""), header);
    }
}

/// The `[signing]` names as configured: the identity fields and the extra headers.
#[test]
fn client_address_header_refuses_the_configured_signing_fields() {
    let signing = "user_header = \"x-user\"\nroles_header = \"x-roles\"\n\
                   extra_headers = [\"x-tenant\"]\n";
    for header in ["x-user", "X-Roles", "x-tenant"] {
        let err = parse(&with_header(header, signing)).unwrap_err();
        assert_eq!(err.key(), "server.client_address_header", "{header}: {err}");
        assert!(
            err.problem().contains(&header.to_ascii_lowercase()),
            "{err}"
        );
        assert!(err.problem().contains("signing."), "{err}");
    }
    // The default names are free once the identity goes in other fields.
    let c = parse(&with_header("x-auth-user", signing)).unwrap();
    assert_eq!(c.server.trusted_proxies.header().as_str(), "x-auth-user");
}

#[test]
fn client_address_header_takes_client_address_fields() {
    for header in [
        "x-real-ip",
        "X-Real-IP",
        "x-forwarded-for",
        "true-client-ip",
        "cf-connecting-ip",
        "x-client-ip",
    ] {
        let c = parse(&with_header(header, "")).unwrap_or_else(|e| panic!("{header}: {e}"));
        assert_eq!(
            c.server.trusted_proxies.header().as_str(),
            header.to_ascii_lowercase(),
            "{header}"
        );
    }
}

/// `countersign check-config` refuses it too: exit status non-zero, the file and key named.
#[test]
fn check_config_refuses_a_client_address_header_the_proxy_relies_on() {
    let dir = TestDir::new("config-review");
    std::fs::write(dir.join("keys.toml"), KEYS).unwrap();
    let path: PathBuf = dir.join("proxy.toml");
    for (header, refused) in [("origin", true), ("cookie", true), ("x-real-ip", false)] {
        std::fs::write(&path, with_header(header, "")).unwrap();
        let out = support_cli::check_config(&path);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(!out.status.success(), refused, "{header}: {stderr}");
        if refused {
            assert!(
                stderr.contains(&format!(
                    "{}: server.client_address_header: ",
                    path.display()
                )),
                "{header}: {stderr}"
            );
            assert!(stderr.contains(header), "{stderr}");
        }
    }
}

/// The proxy drops a browser's `X_Auth_User` (the `_` spelling of the identity field, which
/// CGI-style upstreams read as the same `HTTP_X_AUTH_USER`) only for names holding `_`: an
/// identity name configured with `_` would let the browser's `X-Auth-User` through to such an
/// upstream. So such a name is refused, naming the key.
#[test]
fn identity_header_names_with_an_underscore_are_refused() {
    for key in ["user_header", "roles_header"] {
        let text = config(
            "http://127.0.0.1:9000/verify",
            "http://127.0.0.1:9001",
            "",
            &format!("{key} = \"x_auth_who\""),
        );
        let error = parse(&text).expect_err(key).to_string();
        assert!(
            error.contains(&format!("signing.{key}")) && error.contains("x-auth-who"),
            "{key}: {error}"
        );
    }
}

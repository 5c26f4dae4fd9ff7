//! RFC 9421 §2: component identifiers and how each component's value is read from a request.
//!
//! A [`RequestView`] is the read-only view of a request that the signature base is computed
//! over. It borrows the method, URI and headers (no copying on the hot path) and carries the
//! two facts a server cannot read from the request itself: the scheme it was reached over and,
//! optionally, the authority the verifier expects.

use std::borrow::Cow;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::HashMap;

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method, Uri};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use sfv::{ListEntry, Parser, SerializeValue};

use super::error::{BaseError, BaseErrorKind};
use super::profile::MAX_SIGNATURE_FIELD_BYTES;
use super::sf_fast::{self, Bare};

/// The percent-encode set RFC 9421 §2.2.8 uses to re-encode `@query-param` names and values:
/// the WHATWG `application/x-www-form-urlencoded` set (everything but `A-Za-z0-9*-._`), with a
/// space encoded as `%20` rather than `+`.
const QUERY_PARAM_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

/// A read-only view of a request for building signature bases.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub(crate) method: &'a Method,
    pub(crate) uri: &'a Uri,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) scheme: Option<&'a str>,
    pub(crate) authority: Option<&'a str>,
}

impl<'a> RequestView<'a> {
    /// A view of the given request parts. The scheme defaults to the URI's, else `http`; the
    /// authority to the URI's (HTTP/2 `:authority`, absolute-form), else the `Host` header.
    pub fn new(method: &'a Method, uri: &'a Uri, headers: &'a HeaderMap) -> Self {
        RequestView {
            method,
            uri,
            headers,
            scheme: None,
            authority: None,
        }
    }

    /// A view of `http::request::Parts`.
    pub fn from_parts(parts: &'a http::request::Parts) -> Self {
        Self::new(&parts.method, &parts.uri, &parts.headers)
    }

    /// The scheme the request arrived over (a server behind TLS knows it; the URI does not say).
    #[must_use]
    pub fn with_scheme(mut self, scheme: Option<&'a str>) -> Self {
        self.scheme = scheme;
        self
    }

    /// Use this authority instead of the request's own `Host` / `:authority`.
    #[must_use]
    pub fn with_authority(mut self, authority: Option<&'a str>) -> Self {
        self.authority = authority;
        self
    }

    /// The request headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The scheme, lower-cased (borrowed when it already is, as it almost always is).
    pub(crate) fn scheme_str(&self) -> Cow<'a, str> {
        match (self.scheme, self.uri.scheme_str()) {
            (Some(s), _) | (None, Some(s)) => {
                if s.bytes().any(|b| b.is_ascii_uppercase()) {
                    Cow::Owned(s.to_ascii_lowercase())
                } else {
                    Cow::Borrowed(s)
                }
            }
            (None, None) => Cow::Borrowed("http"),
        }
    }

    /// `@authority`: lower-cased host, default port of the scheme dropped.
    pub fn authority_value(&self) -> Result<String, BaseError> {
        let mut out = String::new();
        self.write_authority(&mut out)?;
        Ok(out)
    }

    /// Appends `@authority` to `out` without an intermediate string.
    fn write_authority(&self, out: &mut String) -> Result<(), BaseError> {
        let raw: &str = if let Some(a) = self.authority {
            a
        } else if let Some(a) = self.uri.authority() {
            // A `Host` beside the URI authority must name the same one: a handler or extractor
            // that reads `Host` (virtual hosts, tenants) would otherwise act on a field no
            // signature covers, and no conformant signer sends the two differing.
            if self.headers.contains_key(http::header::HOST) {
                host_agrees(self.headers, a.as_str(), &self.scheme_str())?;
            }
            a.as_str()
        } else {
            let mut hosts = self.headers.get_all(http::header::HOST).iter();
            let host = hosts
                .next()
                .ok_or_else(|| BaseError::new(BaseErrorKind::MissingAuthority))?;
            // RFC 9112 §3.2: a request with more than one Host line is invalid (a server
            // answers 400); signing or verifying either line would bind an ambiguous authority.
            if hosts.next().is_some() {
                return Err(BaseError::new(BaseErrorKind::DuplicateHost));
            }
            host.to_str()
                .map_err(|_| BaseError::new(BaseErrorKind::InvalidValue("host".into())))?
        };
        write_normalized_authority(raw, &self.scheme_str(), out)
    }
}

/// Checks that the request's one `Host` line names `authority` (the URI's), both normalised:
/// RFC 9113 §8.3.1 (a server should treat a differing `Host` beside `:authority` as
/// malformed); over HTTP/1.1 an absolute-form target's authority wins (RFC 9112 §3.2.2) and a
/// differing `Host` is refused as well, so that whatever reads `Host` reads what was signed.
#[cold]
fn host_agrees(headers: &HeaderMap, authority: &str, scheme: &str) -> Result<(), BaseError> {
    let mut hosts = headers.get_all(http::header::HOST).iter();
    let host = hosts.next().map(HeaderValue::as_bytes).unwrap_or_default();
    if hosts.next().is_some() {
        return Err(BaseError::new(BaseErrorKind::DuplicateHost));
    }
    if host == authority.as_bytes() {
        return Ok(());
    }
    let same = std::str::from_utf8(host)
        .ok()
        .and_then(|host| normalize_authority(host, scheme).ok())
        .zip(normalize_authority(authority, scheme).ok())
        .is_some_and(|(host, authority)| host == authority);
    if same {
        Ok(())
    } else {
        Err(BaseError::new(BaseErrorKind::HostDiffersFromAuthority))
    }
}

/// Lower-cases an authority, strips userinfo and the scheme's default port.
pub fn normalize_authority(raw: &str, scheme: &str) -> Result<String, BaseError> {
    let mut out = String::with_capacity(raw.len());
    write_normalized_authority(raw, scheme, &mut out)?;
    Ok(out)
}

/// [`normalize_authority`], appending to `out`.
fn write_normalized_authority(raw: &str, scheme: &str, out: &mut String) -> Result<(), BaseError> {
    // The usual authority, a lower-case host name or IPv4 address without userinfo, with at
    // most a port that is not the scheme's default (`api.internal:8080`, as upstream URLs often
    // are), is already normal: nothing to trim, strip or lower-case, and every byte is valid.
    let mut colons = 0usize;
    let plain = !raw.is_empty()
        && raw.bytes().all(|b| {
            colons += usize::from(b == b':');
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b':'
        });
    let default_port = match scheme {
        "https" | "wss" => ":443",
        "http" | "ws" => ":80",
        _ => "",
    };
    if plain
        && !raw.starts_with(':')
        && !raw.ends_with(':')
        && (colons == 0
            || (colons == 1 && (default_port.is_empty() || !raw.ends_with(default_port))))
    {
        out.push_str(raw);
        return Ok(());
    }
    write_normalized_authority_in_full(raw, scheme, out)
}

/// [`write_normalized_authority`] for any authority.
fn write_normalized_authority_in_full(
    raw: &str,
    scheme: &str,
    out: &mut String,
) -> Result<(), BaseError> {
    let raw = raw.trim();
    // One backwards pass over host and port (everything after the last `@`, which ends any
    // userinfo): check every byte, find the port's `:` (the last one after any `]` of an IPv6
    // literal), note whether anything needs lower-casing.
    let bytes = raw.as_bytes();
    let mut host_start = 0;
    let mut port_colon = None;
    let mut past_bracket = false;
    let mut upper = false;
    for (i, &b) in bytes.iter().enumerate().rev() {
        match b {
            b'@' => {
                host_start = i + 1;
                break;
            }
            b'/' | b'?' | b'#' => return Err(invalid_authority()),
            b']' => past_bracket = true,
            b':' if !past_bracket && port_colon.is_none() => port_colon = Some(i),
            // A second `:` outside an IPv6 literal (`host:80:80`): which one starts the port is
            // open to two readings, as with a lone bracket below.
            b':' if !past_bracket => return Err(invalid_authority()),
            _ if !b.is_ascii_graphic() => return Err(invalid_authority()),
            _ => upper |= b.is_ascii_uppercase(),
        }
    }
    let mut kept = raw.get(host_start..).unwrap_or_default();
    // No host before the port (`:80`, `user@:443`): normalising would leave an empty or
    // port-only authority.
    if kept.is_empty() || port_colon == Some(host_start) {
        return Err(invalid_authority());
    }
    // An IPv6 literal is bracketed on both sides: a lone `[` or `]` leaves the host's end, and
    // so where a port starts, open to two readings (`[::1:80`), which a signature must not be.
    if kept.starts_with('[') != past_bracket {
        return Err(invalid_authority());
    }
    let default_port = match scheme {
        "https" | "wss" => Some(":443"),
        "http" | "ws" => Some(":80"),
        _ => None,
    };
    if let Some(colon) = port_colon {
        // Lower-casing cannot move `]`, `:` or digits, so this is decided on the raw text.
        // An empty port (`h:`) is dropped with its `:` for every scheme, as the default one
        // is (RFC 3986 §6.2.3, which RFC 9110 §4.2.3 and RFC 9421 §2.2.3 refer to): `h:` and
        // `h` are one authority, and a peer that normalises so would compute another base.
        let port = raw.get(colon..);
        if port == Some(":") || (default_port.is_some() && port == default_port) {
            kept = raw.get(host_start..colon).unwrap_or_default();
        }
    }
    let start = out.len();
    out.push_str(kept);
    if upper {
        if let Some(pushed) = out.get_mut(start..) {
            pushed.make_ascii_lowercase();
        }
    }
    Ok(())
}

#[cold]
fn invalid_authority() -> BaseError {
    BaseError::new(BaseErrorKind::InvalidAuthority)
}

/// What one signature-base construction reads at most once, however many covered components
/// need it: each dictionary field's parsed value (for its `;key` components) and the query's
/// parameters (for the `@query-param` components).
///
/// Without it each such component re-read its whole field or query, so a list of N of them
/// over a field or query of size S cost O(N * S): a hostile `Signature-Input` of thousands of
/// `"x";key="kI"` components over a 200 KB dictionary field took seconds of CPU before the
/// MAC was checked. With it the base costs one parse per field and one per query, plus one
/// lookup per component.
///
/// Both parts start as `None` and stay so (no allocation, no hasher seeded) for a base with no
/// `;key` and no `@query-param` component, as every countersign signature is.
#[derive(Debug, Default)]
pub(crate) struct LineCache<'c> {
    /// Field name -> the field's lines joined and parsed as an RFC 8941 dictionary.
    dictionaries: Option<HashMap<&'c str, sfv::Dictionary>>,
    /// Re-encoded parameter name -> its re-encoded values, in query order.
    query_params: Option<HashMap<String, Vec<String>>>,
}

impl LineCache<'_> {
    /// The query's parameters, parsed and re-encoded on first use (RFC 9421 §2.2.8).
    fn query_params(&mut self, uri: &Uri) -> &HashMap<String, Vec<String>> {
        self.query_params.get_or_insert_with(|| {
            let query = uri.query().unwrap_or("");
            let mut params: HashMap<String, Vec<String>> = HashMap::new();
            for (name, value) in form_urlencoded::parse(query.as_bytes()) {
                let name: String =
                    percent_encoding::utf8_percent_encode(&name, QUERY_PARAM_SET).collect();
                let value: String =
                    percent_encoding::utf8_percent_encode(&value, QUERY_PARAM_SET).collect();
                params.entry(name).or_default().push(value);
            }
            params
        })
    }
}

/// What a component identifier names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ComponentKind {
    Method,
    Authority,
    Scheme,
    TargetUri,
    RequestTarget,
    Path,
    Query,
    QueryParam(String),
    Field(FieldComponent),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldComponent {
    pub(crate) name: String,
    /// `name` as a header name, parsed once; `None` if it cannot be one (then it is never
    /// present on a request).
    pub(crate) header: Option<http::HeaderName>,
    pub(crate) key: Option<String>,
    pub(crate) bs: bool,
}

/// One covered component: its identifier exactly as serialised on the wire, and what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentId {
    pub(crate) serialized: String,
    pub(crate) kind: ComponentKind,
}

impl ComponentId {
    /// The component's name (`@method`, `content-digest`, …), without parameters.
    pub fn name(&self) -> &str {
        match &self.kind {
            ComponentKind::Method => "@method",
            ComponentKind::Authority => "@authority",
            ComponentKind::Scheme => "@scheme",
            ComponentKind::TargetUri => "@target-uri",
            ComponentKind::RequestTarget => "@request-target",
            ComponentKind::Path => "@path",
            ComponentKind::Query => "@query",
            ComponentKind::QueryParam(_) => "@query-param",
            ComponentKind::Field(f) => &f.name,
        }
    }

    /// True when this is the plain (no parameters) identifier of `name`.
    pub fn is_plain(&self, name: &str) -> bool {
        let plain = match &self.kind {
            ComponentKind::Field(f) => f.key.is_none() && !f.bs,
            ComponentKind::QueryParam(_) => false,
            _ => true,
        };
        plain && self.name() == name
    }

    /// The identifier as it appears in the signature base (`"@query-param";name="a"`).
    pub fn as_serialized(&self) -> &str {
        &self.serialized
    }

    /// Parses `"name"` (optionally with RFC 9421 parameters) as written in `Signature-Input`.
    pub fn parse(text: &str) -> Result<Self, BaseError> {
        let item = Parser::parse_item(text.as_bytes())
            .map_err(|_| BaseError::new(BaseErrorKind::MalformedComponentId(text.to_owned())))?;
        Self::from_item(&sf_fast::Item::from_sfv(&item))
    }

    /// A plain identifier for a known-good lower-case name, without parsing.
    pub(crate) fn plain(name: &str) -> Result<Self, BaseError> {
        let kind = kind_for(name, &[])?;
        Ok(ComponentId {
            serialized: format!("\"{name}\""),
            kind,
        })
    }

    pub(crate) fn from_item(item: &sf_fast::Item<'_>) -> Result<Self, BaseError> {
        let name = match item.bare {
            Bare::String(s) => s,
            _ => {
                return Err(BaseError::new(BaseErrorKind::MalformedComponentId(
                    format!("{:?}", item.to_sfv().bare_item),
                )))
            }
        };
        let kind = kind_for(name, &item.params)?;
        // Without parameters the RFC 8941 serialisation is the name in quotes: `kind_for` admits
        // no name holding `"` or `\`, so nothing needs escaping. This skips sfv's serialiser for
        // the common case on the verification hot path. Parameters are serialised as RFC 8941
        // does (tests/core_fastpath.rs checks this against sfv's serialiser).
        let mut serialized = String::with_capacity(name.len() + 2);
        serialized.push('"');
        serialized.push_str(name);
        serialized.push('"');
        sf_fast::write_params(&mut serialized, &item.params).map_err(|_| {
            BaseError::new(BaseErrorKind::MalformedComponentId(
                "parameter value cannot be serialised".to_owned(),
            ))
        })?;
        Ok(ComponentId { serialized, kind })
    }

    /// Appends this component's value for `view` to `out` (one or more base lines). `cache`
    /// holds what earlier components of the same base already parsed (see [`LineCache`]).
    pub(crate) fn write_lines<'c>(
        &'c self,
        view: &RequestView<'_>,
        out: &mut String,
        cache: &mut LineCache<'c>,
    ) -> Result<(), BaseError> {
        match &self.kind {
            ComponentKind::QueryParam(wanted) => {
                match cache
                    .query_params(view.uri)
                    .get(wanted.as_str())
                    .map(Vec::as_slice)
                {
                    Some([value]) => {
                        out.push_str(&self.serialized);
                        out.push_str(": ");
                        out.push_str(value);
                        out.push('\n');
                        Ok(())
                    }
                    // RFC 9421 §2.2.8: "If a parameter name occurs multiple times in a request,
                    // the named query parameter MUST NOT be included."
                    Some(_) => Err(BaseError::new(BaseErrorKind::MalformedComponentId(
                        format!(
                            "{}: the query holds this parameter more than once (RFC 9421 §2.2.8)",
                            self.serialized
                        ),
                    ))),
                    None => Err(BaseError::new(BaseErrorKind::MissingQueryParam(
                        wanted.clone(),
                    ))),
                }
            }
            _ => {
                out.push_str(&self.serialized);
                out.push_str(": ");
                self.write_value(view, out, cache)?;
                out.push('\n');
                Ok(())
            }
        }
    }

    /// Appends this component's line with `value` as its value (see
    /// `SignatureBaseBuilder::build_recording`'s `known`).
    pub(crate) fn write_known_line(&self, value: &str, out: &mut String) {
        out.push_str(&self.serialized);
        out.push_str(": ");
        out.push_str(value);
        out.push('\n');
    }

    fn write_value<'c>(
        &'c self,
        view: &RequestView<'_>,
        out: &mut String,
        cache: &mut LineCache<'c>,
    ) -> Result<(), BaseError> {
        match &self.kind {
            ComponentKind::Method => out.push_str(view.method.as_str()),
            ComponentKind::Authority => view.write_authority(out)?,
            ComponentKind::Scheme => out.push_str(&view.scheme_str()),
            ComponentKind::TargetUri => {
                out.push_str(&view.scheme_str());
                out.push_str("://");
                view.write_authority(out)?;
                // RFC 9112 §3.3: for an authority-form (CONNECT) or asterisk-form (`OPTIONS *`)
                // request target, the target URI's path and query are empty.
                let authority_form =
                    view.method == Method::CONNECT && view.uri.path_and_query().is_none();
                let asterisk_form = view.method == Method::OPTIONS && view.uri.path() == "*";
                if !authority_form && !asterisk_form {
                    push_path_and_query(out, view.uri, "@target-uri")?;
                }
            }
            ComponentKind::RequestTarget => {
                // RFC 9421 §2.2.5: an authority-form target (`CONNECT www.example.com:80`) as
                // received, not normalised like `@authority`; an extended CONNECT (RFC 8441)
                // has a path, and its target is that, as for any other method.
                match (
                    view.method == Method::CONNECT,
                    view.uri.path_and_query(),
                    view.uri.authority(),
                ) {
                    (true, None, Some(authority)) => {
                        push_checked(out, authority.as_str(), "@request-target")?;
                    }
                    _ if view.method == Method::OPTIONS && view.uri.path() == "*" => out.push('*'),
                    _ => push_path_and_query(out, view.uri, "@request-target")?,
                }
            }
            ComponentKind::Path => {
                let path = view.uri.path();
                push_checked(out, if path.is_empty() { "/" } else { path }, "@path")?;
            }
            ComponentKind::Query => {
                out.push('?');
                push_checked(out, view.uri.query().unwrap_or(""), "@query")?;
            }
            ComponentKind::QueryParam(_) => {
                return Err(BaseError::new(BaseErrorKind::MalformedComponentId(
                    self.serialized.clone(),
                )))
            }
            ComponentKind::Field(field) => write_field(view.headers, field, out, cache)?,
        }
        Ok(())
    }
}

/// Appends the request target's path and query as received, the path `/` when empty (RFC 9110
/// §4.2.3; RFC 9112 §3.2.1): `http://h` and `http://h?x=1` give `/` and `/?x=1`, as their
/// `@path` is `/`.
fn push_path_and_query(out: &mut String, uri: &Uri, component: &str) -> Result<(), BaseError> {
    let pq = match uri.path_and_query() {
        Some(pq) if !pq.as_str().is_empty() => pq.as_str(),
        _ => "/",
    };
    if pq.starts_with('?') {
        out.push('/');
    }
    push_checked(out, pq, component)
}

fn push_checked(out: &mut String, value: &str, component: &str) -> Result<(), BaseError> {
    // Every byte checked without an early exit, so the loop vectorises.
    if value
        .bytes()
        .fold(false, |bad, b| bad | !(0x20..0x7f).contains(&b))
    {
        return Err(BaseError::new(BaseErrorKind::InvalidValue(
            component.to_owned(),
        )));
    }
    out.push_str(value);
    Ok(())
}

fn kind_for(name: &str, params: &[(&str, Bare<'_>)]) -> Result<ComponentKind, BaseError> {
    let unsupported = |p: &str| {
        Err(BaseError::new(BaseErrorKind::UnsupportedParameter {
            component: name.to_owned(),
            parameter: p.to_owned(),
        }))
    };
    if let Some(derived) = name.strip_prefix('@') {
        let kind = match derived {
            "method" => ComponentKind::Method,
            "authority" => ComponentKind::Authority,
            "scheme" => ComponentKind::Scheme,
            "target-uri" => ComponentKind::TargetUri,
            "request-target" => ComponentKind::RequestTarget,
            "path" => ComponentKind::Path,
            "query" => ComponentKind::Query,
            "query-param" => {
                let mut wanted = None;
                for (p, v) in params {
                    match (*p, v) {
                        ("name", Bare::String(s)) => wanted = Some((*s).to_owned()),
                        _ => return unsupported(p),
                    }
                }
                return wanted.map(ComponentKind::QueryParam).ok_or_else(|| {
                    BaseError::new(BaseErrorKind::MissingParameter {
                        component: name.to_owned(),
                        parameter: "name",
                    })
                });
            }
            _ => {
                return Err(BaseError::new(BaseErrorKind::UnknownDerivedComponent(
                    name.to_owned(),
                )))
            }
        };
        if let Some((p, _)) = params.iter().next() {
            return unsupported(p);
        }
        return Ok(kind);
    }
    if name.is_empty()
        || !name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
    {
        return Err(BaseError::new(BaseErrorKind::MalformedComponentId(
            name.to_owned(),
        )));
    }
    let mut field = FieldComponent {
        name: name.to_owned(),
        header: http::HeaderName::from_bytes(name.as_bytes()).ok(),
        key: None,
        bs: false,
    };
    for (p, v) in params {
        match (*p, v) {
            ("key", Bare::String(k)) => field.key = Some((*k).to_owned()),
            ("bs", Bare::Boolean(true)) => field.bs = true,
            _ => return unsupported(p),
        }
    }
    if field.key.is_some() && field.bs {
        return unsupported("bs");
    }
    Ok(ComponentKind::Field(field))
}

/// RFC 9421 §2.1: the field's lines, each trimmed, joined with `", "`; or a dictionary member
/// (`;key`, the field parsed once per base: see [`LineCache`]), or each line as a byte sequence
/// (`;bs`).
fn write_field<'c>(
    headers: &HeaderMap,
    field: &'c FieldComponent,
    out: &mut String,
    cache: &mut LineCache<'c>,
) -> Result<(), BaseError> {
    let mut lines = match &field.header {
        Some(name) => headers.get_all(name).iter().peekable(),
        None => headers.get_all("").iter().peekable(),
    };
    if lines.peek().is_none() {
        return Err(BaseError::new(BaseErrorKind::MissingField(
            field.name.clone(),
        )));
    }
    if field.bs {
        let mut first = true;
        for line in lines {
            if !first {
                out.push_str(", ");
            }
            first = false;
            out.push(':');
            base64::engine::general_purpose::STANDARD.encode_string(trim_ows(line.as_bytes()), out);
            out.push(':');
        }
        return Ok(());
    }
    if let Some(key) = &field.key {
        let dictionaries = cache.dictionaries.get_or_insert_with(HashMap::new);
        let dict = match dictionaries.entry(field.name.as_str()) {
            MapEntry::Occupied(parsed) => parsed.into_mut(),
            MapEntry::Vacant(slot) => {
                let mut joined = String::new();
                join_lines(lines, field, &mut joined)?;
                // Parsing materialises every member, item and parameter, at up to ~200 bytes
                // of heap per byte of text, and a verifier builds the base before it checks the
                // MAC: the field is bounded as the signature's own fields are.
                if joined.len() > MAX_SIGNATURE_FIELD_BYTES {
                    return Err(BaseError::new(BaseErrorKind::FieldTooLong {
                        field: field.name.clone(),
                        len: joined.len(),
                        limit: MAX_SIGNATURE_FIELD_BYTES,
                    }));
                }
                let mut dict = Parser::parse_dictionary(joined.as_bytes()).map_err(|_| {
                    BaseError::new(BaseErrorKind::InvalidStructuredField(field.name.clone()))
                })?;
                // Members are re-serialised below; decimals in RFC 8941's canonical form.
                sf_fast::canonicalize_decimals(dict.values_mut());
                slot.insert(dict)
            }
        };
        let member = dict.get(key).ok_or_else(|| {
            BaseError::new(BaseErrorKind::MissingDictionaryKey {
                component: field.name.clone(),
                key: key.clone(),
            })
        })?;
        let serialized = match member {
            ListEntry::Item(item) => item.serialize_value(),
            ListEntry::InnerList(inner) => {
                vec![ListEntry::InnerList(inner.clone())].serialize_value()
            }
        }
        .map_err(|_| BaseError::new(BaseErrorKind::InvalidStructuredField(field.name.clone())))?;
        out.push_str(&serialized);
        return Ok(());
    }
    join_lines(lines, field, out)
}

/// Appends the field's lines to `out`, each trimmed, joined with `", "`; on a line that is not
/// ASCII, appends nothing and fails.
fn join_lines<'h>(
    lines: impl Iterator<Item = &'h http::HeaderValue>,
    field: &FieldComponent,
    out: &mut String,
) -> Result<(), BaseError> {
    let start = out.len();
    let mut first = true;
    for line in lines {
        let Some(value) = field_text(line) else {
            out.truncate(start);
            return Err(BaseError::new(BaseErrorKind::InvalidValue(
                field.name.clone(),
            )));
        };
        if !first {
            out.push_str(", ");
        }
        first = false;
        out.push_str(value);
    }
    Ok(())
}

/// A field line's value without leading and trailing spaces and tabs, if it is ASCII.
///
/// A `HeaderValue` holds only visible ASCII, space, tab and bytes >= 0x80, so "is ASCII" is
/// exactly what `HeaderValue::to_str` checks; it checks in one vectorised pass and hands out
/// the `&str` without a second (UTF-8) validation, which `is_ascii` + `str::from_utf8` paid.
pub(crate) fn field_text(value: &http::HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let bytes = text.as_bytes();
    let start = bytes
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(start, |last| last + 1);
    text.get(start..end)
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_normalisation() {
        assert_eq!(
            normalize_authority("Example.COM:80", "http").unwrap(),
            "example.com"
        );
        assert_eq!(
            normalize_authority("example.com:443", "https").unwrap(),
            "example.com"
        );
        assert_eq!(
            normalize_authority("example.com:443", "http").unwrap(),
            "example.com:443"
        );
        assert_eq!(
            normalize_authority("example.com:8080", "http").unwrap(),
            "example.com:8080"
        );
        assert_eq!(normalize_authority("[::1]:80", "http").unwrap(), "[::1]");
        assert_eq!(normalize_authority("[::1]", "http").unwrap(), "[::1]");
        assert_eq!(normalize_authority("user@h:80", "http").unwrap(), "h");
        assert_eq!(normalize_authority("h:8080", "http").unwrap(), "h:8080");
        // An empty port is no port, whatever the scheme (RFC 3986 §6.2.3).
        assert_eq!(normalize_authority("h:", "http").unwrap(), "h");
        assert_eq!(normalize_authority("H:", "https").unwrap(), "h");
        assert_eq!(normalize_authority("h:", "coap").unwrap(), "h");
        assert_eq!(normalize_authority("[::1]:", "http").unwrap(), "[::1]");
        assert_eq!(normalize_authority("u@h:", "http").unwrap(), "h");
        assert!(normalize_authority(":", "http").is_err());
        assert!(normalize_authority("h::", "http").is_err());
        assert!(normalize_authority("", "http").is_err());
        assert!(normalize_authority("a b", "http").is_err());
    }

    fn target_uri(method: Method, uri: &str, host: &str) -> String {
        let uri: Uri = uri.parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, host.parse().unwrap());
        let view = RequestView::new(&method, &uri, &headers);
        let mut out = String::new();
        let id = ComponentId::plain("@target-uri").unwrap();
        id.write_value(&view, &mut out, &mut LineCache::default())
            .unwrap();
        out
    }

    /// RFC 9112 §3.3: an authority-form or asterisk-form request target leaves the target URI
    /// without path and query; every other form has its path and query, `/` when empty.
    #[test]
    fn target_uri_of_connect_and_options_asterisk() {
        let cases = [
            (
                Method::OPTIONS,
                "*",
                "api.example:8080",
                "http://api.example:8080",
            ),
            (
                Method::CONNECT,
                "api.example:443",
                "api.example:443",
                "http://api.example:443",
            ),
            (Method::OPTIONS, "/x?y", "h", "http://h/x?y"),
            (Method::OPTIONS, "http://h", "h", "http://h/"),
            (Method::GET, "/", "h", "http://h/"),
            (Method::GET, "/a/b?c=d", "H:80", "http://h/a/b?c=d"),
            (Method::CONNECT, "http://h/chat", "h", "http://h/chat"),
        ];
        for (method, uri, host, expected) in cases {
            assert_eq!(
                target_uri(method.clone(), uri, host),
                expected,
                "{method} {uri}"
            );
        }
    }

    /// The normalisation with its shortcut appends what the full pass appends, and fails
    /// where it fails.
    fn assert_shortcut_agrees(raw: &str, scheme: &str) {
        let mut short = String::from("prefix ");
        let mut full = String::from("prefix ");
        let short_result = write_normalized_authority(raw, scheme, &mut short);
        let full_result = write_normalized_authority_in_full(raw, scheme, &mut full);
        assert_eq!(
            short_result.is_ok(),
            full_result.is_ok(),
            "{raw:?} {scheme}"
        );
        assert_eq!(short, full, "{raw:?} {scheme}");
    }

    /// The shortcut for plain host names gives what the full normalisation gives.
    #[test]
    fn plain_host_shortcut_equals_full_normalisation() {
        for raw in [
            "example.com",
            "api.internal.example.com",
            "a-b.c0",
            "127.0.0.1",
            "x",
            "-",
            ".",
            "Example.com",
            "example.com:80",
            "user@example.com",
            " example.com",
            "example.com\t",
            "ex_ample.com",
            "[::1]",
            "",
            "h:8080",
            "127.0.0.1:8080",
            "127.0.0.1:80",
            "example.com:443",
            "example.com:4430",
            "example.com:180",
            ":8080",
            ":80",
            ":443",
            "h:",
            "h:080",
            "a:b:c",
            "::1",
            "h:8080:",
            "H:8080",
        ] {
            for scheme in ["http", "https", "ws", "wss", "ftp"] {
                assert_shortcut_agrees(raw, scheme);
            }
        }
    }

    /// The same, for every string of up to four characters from an alphabet that reaches
    /// both sides of the shortcut (ports, default ports, upper case, userinfo, brackets).
    #[test]
    fn shortcut_equals_full_normalisation_exhaustively() {
        const ALPHABET: &[u8] = b"a1.:-A@[]84 03";
        let mut raw = Vec::with_capacity(4);
        let mut checked = 0;
        for len in 0..=4u32 {
            for mut n in 0..ALPHABET.len().pow(len) {
                raw.clear();
                for _ in 0..len {
                    raw.push(ALPHABET[n % ALPHABET.len()]);
                    n /= ALPHABET.len();
                }
                let raw = std::str::from_utf8(&raw).unwrap();
                for scheme in ["http", "https", "ftp"] {
                    assert_shortcut_agrees(raw, scheme);
                    checked += 1;
                }
            }
        }
        assert!(checked > 100_000);
    }

    /// Lines of `;key` and `@query-param` components read from the per-base cache: several
    /// members of one field, several fields, several parameters, and the errors of a missing
    /// member, a missing parameter, a repeated parameter and a field that is no dictionary.
    #[test]
    fn cached_dictionary_and_query_lines() {
        let request = http::Request::builder()
            .uri("/p?a=1&b=x%20y&d=3&c&d=4")
            .header("host", "h")
            .header("x", "k1=1, k2=(a b);p")
            .header("x", "k3=?0")
            .header("y", "k1=9")
            .header("z", "not a dictionary (")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let view = RequestView::from_parts(&parts);
        let ids: Vec<ComponentId> = [
            "\"x\";key=\"k2\"",
            "\"@query-param\";name=\"a\"",
            "\"y\";key=\"k1\"",
            "\"x\";key=\"k3\"",
            "\"x\"",
            "\"@query-param\";name=\"b\"",
            "\"x\";key=\"k1\"",
            "\"@query-param\";name=\"c\"",
        ]
        .iter()
        .map(|text| ComponentId::parse(text).unwrap())
        .collect();
        let mut cache = LineCache::default();
        let mut out = String::new();
        for id in &ids {
            id.write_lines(&view, &mut out, &mut cache).unwrap();
        }
        assert_eq!(
            out,
            "\"x\";key=\"k2\": (a b);p\n\
             \"@query-param\";name=\"a\": 1\n\
             \"y\";key=\"k1\": 9\n\
             \"x\";key=\"k3\": ?0\n\
             \"x\": k1=1, k2=(a b);p, k3=?0\n\
             \"@query-param\";name=\"b\": x%20y\n\
             \"x\";key=\"k1\": 1\n\
             \"@query-param\";name=\"c\": \n"
        );
        for (text, error) in [
            ("\"x\";key=\"k9\"", "no member \"k9\""),
            (
                "\"@query-param\";name=\"e\"",
                "query parameter \"e\" is absent",
            ),
            ("\"@query-param\";name=\"d\"", "more than once"),
            ("\"z\";key=\"k1\"", "not a valid structured dictionary"),
        ] {
            let id = ComponentId::parse(text).unwrap();
            let err = id
                .write_lines(&view, &mut out, &mut LineCache::default())
                .unwrap_err();
            assert!(err.to_string().contains(error), "{text}: {err}");
        }
    }

    #[test]
    fn component_parameters() {
        assert!(ComponentId::parse("\"x\";sf").is_err());
        assert!(ComponentId::parse("\"x\";req").is_err());
        assert!(ComponentId::parse("\"x\";key=\"a\";bs").is_err());
        assert!(ComponentId::parse("\"@method\";name=\"a\"").is_err());
        assert!(ComponentId::parse("\"@query-param\"").is_err());
        assert!(ComponentId::parse("\"@status\"").is_err());
        assert!(ComponentId::parse("\"X-Upper\"").is_err());
        assert!(ComponentId::parse("token").is_err());
        let c = ComponentId::parse("\"@query-param\";name=\"a\"").unwrap();
        assert_eq!(c.as_serialized(), "\"@query-param\";name=\"a\"");
    }
}

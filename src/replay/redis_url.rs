//! Checks of the text of Redis settings, shared by every front end that takes them (the proxy's
//! `[session] redis_*` keys, the CLI's `--replay-redis*` options): the host of a URL authority,
//! the entries of a `host:port` list (Redis Cluster nodes, sentinels), and the host-less URL
//! that gives the credentials, database and TLS of servers named elsewhere.
//!
//! Pure functions: nothing connects. Each returns the problem, never a message naming a key or
//! an option: the caller wraps it with its own (`proxy.toml: session.redis_url: ...`,
//! `--replay-redis: ...`). No problem ever holds a password.

use std::fmt;

use super::SentinelOptions;

/// The host of a URL authority (`[user:password@]host[:port]`): after any user info (up to the
/// last `@`), before any port; an IPv6 literal with its brackets (`[::1]`). Empty when there is
/// none (`:6379`, `user:password@`, ``).
///
/// ```
/// use countersign::replay::url_authority_host;
/// assert_eq!(url_authority_host(":pw@10.0.0.1:6379"), "10.0.0.1");
/// assert_eq!(url_authority_host("[::1]:6379"), "[::1]");
/// assert_eq!(url_authority_host(":pw@"), "");
/// ```
pub fn url_authority_host(authority: &str) -> &str {
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    match host_port.strip_prefix('[') {
        Some(_) => host_port
            .find(']')
            .map_or(host_port, |end| &host_port[..=end]),
        None => host_port.split(':').next().unwrap_or(""),
    }
}

/// What is wrong with one entry of a `host:port` list (Redis Cluster nodes, sentinels), as
/// [`host_port_entry_problem`] finds it. The port is not checked there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostPortProblem {
    /// The entry is empty (a stray comma).
    Empty,
    /// The entry is a URL (`://`) or holds user info (`@`): its credentials and TLS belong
    /// elsewhere. It may hold a password: never quote it.
    Url,
    /// No host (`:6379`), or whitespace, a control character, `/`, `?` or `#` in it.
    NotHostPort,
}

/// What is wrong with `entry` as a `host:port`, `host` or `[v6]:port` list entry, if anything,
/// the port aside (the caller checks it, or the connection's constructor does).
///
/// ```
/// use countersign::replay::{host_port_entry_problem, HostPortProblem};
/// assert_eq!(host_port_entry_problem("10.0.0.1:6379"), None);
/// assert_eq!(host_port_entry_problem("redis://h:1"), Some(HostPortProblem::Url));
/// assert_eq!(host_port_entry_problem(":6379"), Some(HostPortProblem::NotHostPort));
/// ```
pub fn host_port_entry_problem(entry: &str) -> Option<HostPortProblem> {
    if entry.is_empty() {
        Some(HostPortProblem::Empty)
    } else if entry.contains("://") || entry.contains('@') {
        Some(HostPortProblem::Url)
    } else if url_authority_host(entry).is_empty()
        || entry.contains(|c: char| c.is_whitespace() || c.is_control() || "/?#".contains(c))
    {
        Some(HostPortProblem::NotHostPort)
    } else {
        None
    }
}

/// The server a `host:port` list entry names, to find one listed twice: its host in lower case
/// and its port, `default_port` when none is written (`Redis-A` and `redis-a:6379` are the same
/// node). Meant for entries [`host_port_entry_problem`] accepts.
///
/// ```
/// use countersign::replay::host_port_entry_key;
/// assert_eq!(host_port_entry_key("Redis-A", 6379), host_port_entry_key("redis-a:6379", 6379));
/// ```
pub fn host_port_entry_key(entry: &str, default_port: u16) -> String {
    let host = url_authority_host(entry);
    let lower = host.to_ascii_lowercase();
    match entry[host.len()..].strip_prefix(':') {
        Some(port) => format!("{lower}:{port}"),
        None => format!("{lower}:{default_port}"),
    }
}

/// A host-less Redis URL taken apart (`redis://[user:password@][/db]`, `rediss://...`): what
/// it gives the servers named elsewhere. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct HostLessRedisUrl {
    /// The scheme and user info, as the start of a server's URL: `redis://`,
    /// `rediss://user:password@` (percent-encoded as written). Holds the password.
    pub prefix: String,
    /// The user (decoded), if any.
    pub username: Option<String>,
    /// The password (decoded), if any.
    pub password: Option<String>,
    /// The database (`/db`; 0 when left out).
    pub db: i64,
    /// Whether the scheme is `rediss://` (TLS).
    pub tls: bool,
}

impl HostLessRedisUrl {
    /// The [`SentinelOptions`] of the primary the sentinels name: this URL's user, password,
    /// database and TLS, and the sentinels' own password and TLS (no sentinel user).
    pub fn into_sentinel_options(
        self,
        sentinel_password: Option<String>,
        sentinel_tls: bool,
    ) -> SentinelOptions {
        SentinelOptions {
            username: self.username,
            password: self.password,
            db: self.db,
            tls: self.tls,
            sentinel_username: None,
            sentinel_password,
            sentinel_tls,
        }
    }
}

impl fmt::Debug for HostLessRedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostLessRedisUrl")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "[redacted]"))
            .field("db", &self.db)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// What is wrong with a host-less Redis URL, as [`split_host_less_redis_url`] finds it. No
/// variant holds a password. `Display` says it in words (for [`HostLessUrlProblem::NamesHost`]
/// without the host, which callers quote with where the servers come from instead).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostLessUrlProblem {
    /// The scheme is not `redis://` or `rediss://`.
    Scheme,
    /// The URL names this host (with its brackets for IPv6); the servers come from elsewhere.
    NamesHost(String),
    /// Something that is not a host follows the scheme (`redis://:password`): the `@` that
    /// ends the credentials is missing. Never quoted: it may be the password.
    NoAtAfterCredentials,
    /// A query or fragment (`?`, `#`) is in the URL.
    QueryOrFragment,
    /// The credentials or the database do not parse: the `redis` crate's reason (a fixed text,
    /// never the URL).
    Unparsable(String),
}

impl fmt::Display for HostLessUrlProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostLessUrlProblem::Scheme => f.write_str("the scheme must be redis:// or rediss://"),
            HostLessUrlProblem::NamesHost(_) => f.write_str("it names a host"),
            HostLessUrlProblem::NoAtAfterCredentials => f.write_str(
                "no host may be given, and credentials end with an \"@\" (redis://:password@)",
            ),
            HostLessUrlProblem::QueryOrFragment => f.write_str("no query or fragment"),
            HostLessUrlProblem::Unparsable(text) => write!(f, "not a usable redis URL: {text}"),
        }
    }
}

impl std::error::Error for HostLessUrlProblem {}

/// Takes apart a host-less Redis URL (`redis://[user:password@][/db]`, `rediss://...`), the
/// form that gives the credentials, database and TLS of servers named elsewhere (cluster nodes,
/// sentinels). The authority ends at the first `/`, `?` or `#` and its user info at its last
/// `@` (one inside a password is written `%40`). Checked in this order: the scheme, no host,
/// no query or fragment, then the credentials and database as the `redis` crate parses them.
///
/// ```
/// use countersign::replay::{split_host_less_redis_url, HostLessUrlProblem};
/// let url = split_host_less_redis_url("rediss://app:s3cret@/2").unwrap();
/// assert_eq!((url.prefix.as_str(), url.db, url.tls), ("rediss://app:s3cret@", 2, true));
/// assert_eq!(
///     split_host_less_redis_url("redis://:pw@10.0.0.1:6379"),
///     Err(HostLessUrlProblem::NamesHost("10.0.0.1".to_owned()))
/// );
/// ```
pub fn split_host_less_redis_url(url: &str) -> Result<HostLessRedisUrl, HostLessUrlProblem> {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme @ ("redis" | "rediss"), rest)) => (scheme, rest),
        _ => return Err(HostLessUrlProblem::Scheme),
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    let (user_info, host_port) = match authority.rsplit_once('@') {
        Some((user_info, host_port)) => (Some(user_info), host_port),
        None => (None, authority),
    };
    if !host_port.is_empty() {
        let host = url_authority_host(host_port);
        return Err(if host.is_empty() {
            HostLessUrlProblem::NoAtAfterCredentials
        } else {
            HostLessUrlProblem::NamesHost(host.to_owned())
        });
    }
    if url.contains(['?', '#']) {
        return Err(HostLessUrlProblem::QueryOrFragment);
    }
    let prefix = match user_info {
        Some(user_info) => format!("{scheme}://{user_info}@"),
        None => format!("{scheme}://"),
    };
    // A URL without a host does not parse: the credentials (percent-encoding) and the database
    // are checked on the URL with a placeholder host.
    let info = ::redis::IntoConnectionInfo::into_connection_info(
        format!("{prefix}placeholder-host{path}").as_str(),
    )
    .map_err(|e| HostLessUrlProblem::Unparsable(redis_error_text(&e)))?;
    Ok(HostLessRedisUrl {
        prefix,
        username: info.redis.username,
        password: info.redis.password,
        db: info.redis.db,
        tls: scheme == "rediss",
    })
}

/// Why the `redis` crate does not accept `url` as a connection URL, in words (a fixed text,
/// never the URL); `None` when it parses. The port and the scheme are the caller's to check
/// (the crate reads `host:` as port 6379, and accepts `redis+unix://`).
pub fn redis_url_parse_problem(url: &str) -> Option<String> {
    ::redis::IntoConnectionInfo::into_connection_info(url)
        .err()
        .map(|e| redis_error_text(&e))
}

/// A `redis` crate error in words: its description and detail, without the kind's `Debug`
/// (`- InvalidClientConfig`) that its `Display` appends.
fn redis_error_text(error: &::redis::RedisError) -> String {
    // The only accessor of the description alone.
    #[allow(deprecated)]
    let description = std::error::Error::description(error);
    match error.detail() {
        Some(detail) => format!("{description}: {detail}"),
        None => description.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_an_authority() {
        for (authority, host) in [
            ("10.0.0.1:6379", "10.0.0.1"),
            ("redis-a", "redis-a"),
            (":pw@redis-a:1", "redis-a"),
            ("u:p@w@h", "h"),
            ("[::1]:6379", "[::1]"),
            ("[::1]", "[::1]"),
            ("[::1", "[::1"),
            (":6379", ""),
            (":pw@", ""),
            ("", ""),
        ] {
            assert_eq!(url_authority_host(authority), host, "{authority}");
        }
    }

    #[test]
    fn host_port_entries() {
        for ok in ["10.0.0.1:6379", "redis-a", "[::1]:7000", "h:pw", "h:"] {
            assert_eq!(host_port_entry_problem(ok), None, "{ok}");
        }
        for (entry, problem) in [
            ("", HostPortProblem::Empty),
            ("redis://h:6379", HostPortProblem::Url),
            (":pw@h:6379", HostPortProblem::Url),
            ("h://x", HostPortProblem::Url),
            (":6379", HostPortProblem::NotHostPort),
            ("h 1:6379", HostPortProblem::NotHostPort),
            ("h:6379/0", HostPortProblem::NotHostPort),
            ("h?x", HostPortProblem::NotHostPort),
            ("h#x", HostPortProblem::NotHostPort),
            ("h\n", HostPortProblem::NotHostPort),
        ] {
            assert_eq!(host_port_entry_problem(entry), Some(problem), "{entry:?}");
        }
    }

    #[test]
    fn host_port_keys_fold_case_and_the_default_port() {
        assert_eq!(host_port_entry_key("Redis-A", 6379), "redis-a:6379");
        assert_eq!(host_port_entry_key("redis-a:6379", 6379), "redis-a:6379");
        assert_eq!(host_port_entry_key("redis-a:7000", 6379), "redis-a:7000");
        assert_eq!(host_port_entry_key("[::1]", 26379), "[::1]:26379");
        assert_eq!(host_port_entry_key("[::1]:1", 26379), "[::1]:1");
    }

    #[test]
    fn host_less_urls_taken_apart() {
        let url = split_host_less_redis_url("redis://").unwrap();
        assert_eq!(url.prefix, "redis://");
        assert_eq!(
            (url.username, url.password, url.db, url.tls),
            (None, None, 0, false)
        );
        let url = split_host_less_redis_url("rediss://app:p%40ss@/3").unwrap();
        assert_eq!(url.prefix, "rediss://app:p%40ss@");
        assert_eq!(url.username.as_deref(), Some("app"));
        assert_eq!(url.password.as_deref(), Some("p@ss"));
        assert_eq!((url.db, url.tls), (3, true));
        assert!(!format!("{url:?}").contains("p@ss"), "{url:?}");
        let url = split_host_less_redis_url("redis://:pw@").unwrap();
        assert_eq!(url.prefix, "redis://:pw@");
        assert_eq!(url.password.as_deref(), Some("pw"));
        assert_eq!(
            split_host_less_redis_url("redis://@").unwrap().prefix,
            "redis://@"
        );
        let node = split_host_less_redis_url("rediss://app:pw@/4")
            .unwrap()
            .into_sentinel_options(Some("spw".to_owned()), true);
        assert_eq!(node.username.as_deref(), Some("app"));
        assert_eq!(node.password.as_deref(), Some("pw"));
        assert_eq!((node.db, node.tls, node.sentinel_tls), (4, true, true));
        assert_eq!(node.sentinel_username, None);
        assert_eq!(node.sentinel_password.as_deref(), Some("spw"));
    }

    #[test]
    fn host_less_url_problems() {
        use HostLessUrlProblem::*;
        for (url, problem) in [
            ("http://:pw@", Scheme),
            ("redis:/:pw@", Scheme),
            ("redis+unix:///tmp/s", Scheme),
            (
                "redis://:pw@10.0.0.9:6379/1",
                NamesHost("10.0.0.9".to_owned()),
            ),
            ("redis://h", NamesHost("h".to_owned())),
            ("rediss://[::1]:6379", NamesHost("[::1]".to_owned())),
            // The host is checked first: a query after one is a host named.
            ("redis://h/?x=1", NamesHost("h".to_owned())),
            ("redis://:pw", NoAtAfterCredentials),
            ("redis://:6379/0", NoAtAfterCredentials),
            // A `/` in a password ends the authority: what is before it is no host.
            ("redis://:a/b@/0", NoAtAfterCredentials),
            ("redis://:pw@/?x=1", QueryOrFragment),
            ("redis://:pw@#x", QueryOrFragment),
            // A `?` or `#` (or `/`) in a password ends the authority: never a host in
            // disguise, and what is before it is no host.
            ("redis://h?x=1@", NamesHost("h".to_owned())),
            ("redis://:p#w@", NoAtAfterCredentials),
        ] {
            assert_eq!(split_host_less_redis_url(url), Err(problem), "{url}");
        }
        // The database is not a number: the parser's words, never the password.
        for url in ["redis://:s3cret@/x", "rediss://u:s3cret@/1/2"] {
            match split_host_less_redis_url(url) {
                Err(Unparsable(text)) => assert!(!text.contains("s3cret"), "{url}: {text}"),
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[test]
    fn redis_url_parse_problems_in_words() {
        assert_eq!(redis_url_parse_problem("redis://10.0.0.1:6379/0"), None);
        let problem = redis_url_parse_problem("redis://:s3cret@h/x").unwrap();
        assert!(!problem.contains("s3cret"), "{problem}");
        assert!(!problem.contains("InvalidClientConfig"), "{problem}");
    }
}

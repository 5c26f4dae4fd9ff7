//! The browser's address behind a load balancer (`server.trusted_proxies`,
//! `server.client_address_header`).
//!
//! Why: the proxy counts failed logins per client address (`auth.throttle.max_failures_per_ip`)
//! and tells the API who the client is (`X-Forwarded-For`). Behind a balancer every connection
//! comes from the balancer, so without this every browser shares one address: one attacker's
//! failed logins throttle everyone's, and the API sees only the balancer. The balancer says
//! whom it forwards for in a header (`X-Forwarded-For`, appended to by each hop); the proxy
//! believes that header only from the addresses it is told to trust, as nginx's `realip`
//! module does with `set_real_ip_from` and `real_ip_recursive on`:
//!
//! - a connection from an address outside `trusted_proxies` is its own client, whatever its
//!   headers say (the header is removed before forwarding, as always);
//! - from a trusted address, the header's addresses are read right to left (each hop appends
//!   the address it received from), skipping trusted ones: the first address that is not
//!   trusted is the client. What a client wrote into the header itself is to the left of what
//!   the balancer appended, so it is never reached. Every address trusted: the leftmost.
//! - an element that is not an address (a balancer that writes `unknown`, a name): the client
//!   is the last trusted hop read so far, not anything further left;
//! - no header from a trusted address: the connection's address.
//!
//! Addresses are compared in canonical form: an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`,
//! what a listener on `[::]` sees for an IPv4 peer) is the IPv4 address.

use std::net::{IpAddr, SocketAddr};

use http::header::{HeaderMap, HeaderName};
use ipnet::IpNet;

/// The addresses whose `client_address_header` is believed, and that header's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    header: HeaderName,
    max_hops: usize,
}

/// The default of `server.client_address_max_hops`: at most this many addresses of the header
/// are read, right to left. More hops than any real chain of balancers, and a bound on the
/// work a request can ask for.
pub const DEFAULT_MAX_HOPS: usize = 32;
/// The most `server.client_address_max_hops` may be: each hop costs an address parse and a
/// lookup in the trusted list, and no chain of balancers is this long.
pub const MAX_MAX_HOPS: usize = 1024;

impl TrustedProxies {
    /// `nets`: the trusted addresses and blocks (an empty list trusts nobody: every
    /// connection is its own client). `header`: where the trusted hops name the client.
    pub fn new(nets: Vec<IpNet>, header: HeaderName) -> TrustedProxies {
        let nets = nets.into_iter().map(canonical_net).collect();
        TrustedProxies {
            nets,
            header,
            max_hops: DEFAULT_MAX_HOPS,
        }
    }

    /// The same, reading at most `max_hops` addresses of the header, right to left
    /// (`server.client_address_max_hops`; at least 1): the client is then the last one read
    /// if that one is trusted too. The caller keeps it within 1..=[`MAX_MAX_HOPS`]; 0 is
    /// read as 1.
    pub fn with_max_hops(self, max_hops: usize) -> TrustedProxies {
        TrustedProxies {
            max_hops: max_hops.clamp(1, MAX_MAX_HOPS),
            ..self
        }
    }

    /// How many addresses of the header are read at most.
    pub fn max_hops(&self) -> usize {
        self.max_hops
    }

    /// Nobody trusted: the default.
    pub fn none() -> TrustedProxies {
        TrustedProxies {
            nets: Vec::new(),
            header: HeaderName::from_static("x-forwarded-for"),
            max_hops: DEFAULT_MAX_HOPS,
        }
    }

    /// Whether any address is trusted (false: [`Self::client`] is never needed).
    pub fn any(&self) -> bool {
        !self.nets.is_empty()
    }

    /// The header read.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// Whether a connection from `ip` is one of the trusted balancers (an IPv4-mapped address
    /// as its IPv4 address).
    pub fn trusts_peer(&self, ip: IpAddr) -> bool {
        self.trusts(ip.to_canonical())
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request that came over a connection from `peer` with `headers`: None
    /// when it is `peer` itself (not trusted, or trusted and naming nobody else).
    ///
    /// A peer in IPv4-mapped form (an IPv4 client of a listener on `[::]`) is given back as
    /// its IPv4 address whenever the peer is the client, trusted or not, so that the API and
    /// the throttle see one form whichever the header names.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> Option<IpAddr> {
        let raw_peer = peer;
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return (peer != raw_peer).then_some(peer);
        }
        self.client_of_trusted(peer, headers)
            .or_else(|| (peer != raw_peer).then_some(peer))
    }

    fn client_of_trusted(&self, peer: IpAddr, headers: &HeaderMap) -> Option<IpAddr> {
        let mut client = peer;
        let mut read = 0;
        // Field lines in order, each a comma-separated list: the last element of the last
        // line is the nearest hop's. Split as bytes, not as text: a balancer that joins the
        // lines it received into one (nginx's `$proxy_add_x_forwarded_for`) puts whatever
        // bytes a browser wrote to the left of its own element in the same line, and those
        // must not cost that element (a line refused whole for one byte that is not text made
        // every browser the balancer). An element that is not text is not an address.
        let lines: Vec<_> = headers.get_all(&self.header).iter().collect();
        for line in lines.into_iter().rev() {
            for element in line.as_bytes().rsplit(|&b| b == b',') {
                let element = trim_blanks(element);
                if element.is_empty() {
                    // `a, , b` or a trailing comma: no hop there.
                    continue;
                }
                if read == self.max_hops {
                    return some_other(client, peer);
                }
                read += 1;
                let Some(ip) = std::str::from_utf8(element).ok().and_then(parse_element) else {
                    return some_other(client, peer);
                };
                client = ip;
                if !self.trusts(ip) {
                    return some_other(client, peer);
                }
            }
        }
        some_other(client, peer)
    }
}

/// `net` as the canonical addresses it is compared with: `::ffff:10.0.0.0/104` is
/// `10.0.0.0/8` (and `::ffff:0:0/96` is `0.0.0.0/0`, every IPv4 address: the config's check
/// for a block that trusts everybody must look at this form, not at the text's prefix length).
/// Host bits cleared.
pub fn canonical_net(net: IpNet) -> IpNet {
    let net = match net {
        IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
            Some(v4) if v6.prefix_len() >= 96 => {
                IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).unwrap_or(net)
            }
            _ => net,
        },
        IpNet::V4(_) => net,
    };
    net.trunc()
}

/// `element` without the spaces and tabs around it (the list's optional whitespace).
fn trim_blanks(mut element: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = element {
        element = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = element {
        element = rest;
    }
    element
}

fn some_other(client: IpAddr, peer: IpAddr) -> Option<IpAddr> {
    (client != peer).then_some(client)
}

/// One element of the header: an address, possibly with a port (`192.0.2.7:51234`,
/// `[2001:db8::7]:443`, as some balancers write it) or in brackets without one. Canonical.
fn parse_element(element: &str) -> Option<IpAddr> {
    let ip = element
        .parse::<IpAddr>()
        .ok()
        .or_else(|| element.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            element
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<std::net::Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn trusted(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            nets.iter().map(|n| n.parse().unwrap()).collect(),
            HeaderName::from_static("x-forwarded-for"),
        )
    }

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in lines {
            h.append("x-forwarded-for", HeaderValue::from_str(line).unwrap());
        }
        h
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn client(t: &TrustedProxies, peer: &str, lines: &[&str]) -> Option<IpAddr> {
        t.client(ip(peer), &headers(lines))
    }

    #[test]
    fn an_untrusted_peer_is_its_own_client_whatever_it_says() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(client(&t, "192.0.2.9", &["198.51.100.1"]), None);
        assert_eq!(
            client(&TrustedProxies::none(), "10.0.0.1", &["198.51.100.1"]),
            None
        );
    }

    #[test]
    fn the_rightmost_untrusted_address_is_the_client() {
        let t = trusted(&["10.0.0.0/8", "2001:db8:1::/48"]);
        // What the client wrote itself (203.0.113.66) is left of what the balancer appended.
        assert_eq!(
            client(&t, "10.0.0.2", &["203.0.113.66, 198.51.100.1"]),
            Some(ip("198.51.100.1"))
        );
        // Two trusted hops, over two field lines.
        assert_eq!(
            client(&t, "10.0.0.2", &["203.0.113.66, 198.51.100.1", "10.1.1.1"]),
            Some(ip("198.51.100.1"))
        );
        assert_eq!(
            client(&t, "2001:db8:1::5", &["2001:db8:2::9, 2001:db8:1::7"]),
            Some(ip("2001:db8:2::9"))
        );
        // Every address trusted: the leftmost.
        assert_eq!(
            client(&t, "10.0.0.2", &["10.9.9.9, 10.1.1.1"]),
            Some(ip("10.9.9.9"))
        );
        // No header, or one naming the peer itself: the peer.
        assert_eq!(client(&t, "10.0.0.2", &[]), None);
        assert_eq!(client(&t, "10.0.0.2", &["10.0.0.2"]), None);
    }

    #[test]
    fn ports_brackets_spaces_and_empty_elements_are_read() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            client(&t, "10.0.0.2", &["198.51.100.1:51234"]),
            Some(ip("198.51.100.1"))
        );
        assert_eq!(
            client(&t, "10.0.0.2", &["[2001:db8::7]:443"]),
            Some(ip("2001:db8::7"))
        );
        assert_eq!(
            client(&t, "10.0.0.2", &["[2001:db8::7]"]),
            Some(ip("2001:db8::7"))
        );
        assert_eq!(
            client(&t, "10.0.0.2", &[" 198.51.100.1 ,\t, 10.0.0.9 ,"]),
            Some(ip("198.51.100.1"))
        );
    }

    #[test]
    fn what_is_not_an_address_stops_at_the_last_trusted_hop() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(client(&t, "10.0.0.2", &["198.51.100.1, unknown"]), None);
        assert_eq!(
            client(&t, "10.0.0.2", &["198.51.100.1, unknown, 10.0.0.7"]),
            Some(ip("10.0.0.7"))
        );
        assert_eq!(client(&t, "10.0.0.2", &["198.51.100.1/24"]), None);
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"198.51.100.1\xff").unwrap(),
        );
        assert_eq!(t.client(ip("10.0.0.2"), &h), None);
    }

    #[test]
    fn ipv4_mapped_addresses_are_the_ipv4_addresses() {
        let t = trusted(&["::ffff:10.0.0.0/104"]);
        assert_eq!(
            client(&t, "10.0.0.2", &["::ffff:198.51.100.1"]),
            Some(ip("198.51.100.1"))
        );
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            client(&t, "::ffff:10.0.0.2", &["198.51.100.1"]),
            Some(ip("198.51.100.1"))
        );
    }

    #[test]
    fn a_mapped_peer_is_given_back_in_ipv4_form() {
        // A listener on `[::]`: the balancer itself (no header), and a peer not trusted.
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(client(&t, "::ffff:10.0.0.2", &[]), Some(ip("10.0.0.2")));
        assert_eq!(
            client(&t, "::ffff:192.0.2.9", &["198.51.100.1"]),
            Some(ip("192.0.2.9"))
        );
        assert_eq!(
            client(&t, "::ffff:10.0.0.2", &["10.0.0.2"]),
            Some(ip("10.0.0.2"))
        );
        // Not mapped: unchanged (None: the peer itself).
        assert_eq!(client(&t, "192.0.2.9", &["198.51.100.1"]), None);
        assert_eq!(client(&t, "2001:db8::9", &[]), None);
    }

    #[test]
    fn the_mapped_block_of_every_ipv4_address_is_prefix_zero() {
        let every = canonical_net("::ffff:0:0/96".parse().unwrap());
        assert_eq!(every, "0.0.0.0/0".parse::<IpNet>().unwrap());
        assert_eq!(every.prefix_len(), 0);
        assert_eq!(
            canonical_net("::ffff:10.1.2.3/104".parse().unwrap()),
            "10.0.0.0/8".parse::<IpNet>().unwrap()
        );
        // Shorter than /96: not only mapped addresses, left as it is.
        assert_eq!(
            canonical_net("::ffff:0:0/95".parse().unwrap()),
            "::fffe:0:0/95".parse::<IpNet>().unwrap()
        );
        // As the running list stands, `::ffff:0:0/96` trusts any IPv4 peer's header.
        let t = trusted(&["::ffff:0:0/96"]);
        assert_eq!(
            client(&t, "203.0.113.5", &["198.51.100.1"]),
            Some(ip("198.51.100.1"))
        );
    }

    #[test]
    fn a_chain_longer_than_max_hops_stops_at_the_last_trusted_hop_read() {
        for max_hops in [DEFAULT_MAX_HOPS, 1, 3, 100] {
            let t = trusted(&["10.0.0.0/8"]).with_max_hops(max_hops);
            assert_eq!(t.max_hops(), max_hops);
            let hops: Vec<String> = (0..max_hops + 5)
                .map(|i| format!("10.0.{}.{}", i / 250, i % 250))
                .collect();
            let line = format!("198.51.100.1, {}", hops.join(", "));
            let found = client(&t, "10.0.0.250", &[&line]).unwrap();
            // The max_hops-th from the right (the sixth from the left), not the client
            // beyond it.
            assert_eq!(found, ip(&hops[5]), "{max_hops}");
            // Within the bound, the client is found.
            let line = format!("198.51.100.1, {}", hops[..max_hops - 1].join(", "));
            assert_eq!(
                client(&t, "10.0.0.250", &[&line]),
                Some(ip("198.51.100.1")),
                "{max_hops}"
            );
        }
        // Out of range is clamped, not trusted further or read as "no hop at all".
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(t.clone().with_max_hops(0).max_hops(), 1);
        assert_eq!(t.with_max_hops(usize::MAX).max_hops(), MAX_MAX_HOPS);
    }

    #[test]
    fn bytes_that_are_not_text_left_of_the_balancers_element_do_not_cost_it() {
        // A balancer that joins the lines it received into one (nginx's
        // `$proxy_add_x_forwarded_for`) puts a browser's bytes left of its own element.
        let t = trusted(&["10.0.0.0/8"]);
        for line in [
            &b"\xc3\xa9, 198.51.100.1"[..],
            b"203.0.113.66\xff, 198.51.100.1",
            b"\x80, 10.0.0.7, 198.51.100.1",
        ] {
            let mut h = HeaderMap::new();
            h.append("x-forwarded-for", HeaderValue::from_bytes(line).unwrap());
            assert_eq!(
                t.client(ip("10.0.0.2"), &h),
                Some(ip("198.51.100.1")),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        // Reached (every hop right of it trusted): not an address, the last trusted hop.
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"198.51.100.1, \xc3\xa9, 10.0.0.7").unwrap(),
        );
        assert_eq!(t.client(ip("10.0.0.2"), &h), Some(ip("10.0.0.7")));
    }
}

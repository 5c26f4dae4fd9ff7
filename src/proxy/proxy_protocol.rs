//! The HAProxy PROXY protocol header (`server.proxy_protocol`), read before anything else a
//! connection carries (before TLS).
//!
//! Why: a TCP load balancer (AWS NLB, HAProxy in `mode tcp` with `send-proxy`) passes the
//! connection's bytes through untouched, TLS included, so it cannot add `X-Forwarded-For`;
//! every connection comes from the balancer. It says whom it accepted the connection from in
//! a header it writes first: text (v1, `PROXY TCP4 203.0.113.7 10.0.0.5 51234 443\r\n`, at
//! most 107 bytes) or binary (v2: a 12-byte signature, 4 bytes of version, command, family
//! and length, then the addresses and TLVs). The parsing itself is the `ppp` crate's; this
//! module reads exactly the header's bytes off the socket (nothing of the TLS or HTTP bytes
//! after it) and decides what the header is worth:
//!
//! - only a connection from one of `trusted_proxies` may send one: a connection from any other
//!   address is refused (it went around the balancer, and could name any address);
//! - the header is required: a connection without one (or with a malformed one) is closed
//!   before a byte of HTTP is read, as nginx does on a `proxy_protocol` listener;
//! - `PROXY` with TCP over IPv4 or IPv6: the source address is the client's. `LOCAL` (v2: the
//!   balancer's own health checks), `UNKNOWN` (v1; haproxy's for a client of a UNIX-socket
//!   frontend), families other than IP (UNIX sockets, unspecified) and v2 transports other
//!   than TCP (UDP, unspecified) name no client: [`read_client`] says so (None), and the
//!   connection is then its own client, the balancer, whose `client_address_header` is not
//!   read (`server.rs`'s accept loop). A TCP pass-through balancer writes no such header, so
//!   one on such a connection is the browser's own, and believing it let a browser choose the
//!   address the login throttle counts it under.
//!
//! The time to read it is the connection's `header_read_timeout`, with the TLS handshake and
//! the first request bytes.

use std::net::SocketAddr;

use tokio::io::AsyncReadExt as _;

/// The v2 header's fixed part: the signature and 4 bytes.
const V2_FIXED: usize = 16;
/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header (the protocol's own bound, CRLF included).
const V1_MAX: usize = 107;
/// The shortest v1 header (`PROXY UNKNOWN\r\n`); a v2 header is longer, so this many bytes
/// can be read whatever the version before telling them apart.
const V1_MIN: usize = 15;
/// The default of `server.proxy_protocol_max_bytes`, the longest v2 address block and TLVs
/// accepted: the addresses (at most 216 bytes, UNIX sockets) and the TLVs balancers add (AWS
/// NLB: a VPC endpoint id, ~30 bytes; HAProxy: ALPN, authority, TLS details). The protocol
/// allows 64 KiB; a header over the limit is refused, so a connection cannot make the proxy
/// hold more than this before it is known to be a balancer's.
pub const DEFAULT_MAX_V2_PAYLOAD: usize = 1024;
/// The least `server.proxy_protocol_max_bytes` may be: the largest address block (two UNIX
/// socket paths), so that every header without TLVs fits.
pub const MIN_MAX_V2_PAYLOAD: usize = 216;
/// The most it may be: all that the header's 16-bit length can say.
pub const MAX_MAX_V2_PAYLOAD: usize = u16::MAX as usize;

/// Why a connection's PROXY header was refused (for the connection's debug line).
#[derive(Debug)]
pub enum ProxyHeaderError {
    /// The socket failed or closed before the header was whole.
    Io(std::io::Error),
    /// The bytes are not a PROXY header (none was sent, or a malformed one).
    Malformed(String),
    /// A v2 header whose address block and TLVs are over the limit.
    TooLong {
        /// The bytes of addresses and TLVs the header announced.
        len: usize,
        /// The limit (`server.proxy_protocol_max_bytes`).
        max: usize,
    },
}

impl std::fmt::Display for ProxyHeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyHeaderError::Io(e) => write!(f, "PROXY header not read: {e}"),
            ProxyHeaderError::Malformed(why) => write!(f, "no valid PROXY header: {why}"),
            ProxyHeaderError::TooLong { len, max } => write!(
                f,
                "PROXY v2 header of {len} bytes of addresses and TLVs, over \
                 server.proxy_protocol_max_bytes ({max})"
            ),
        }
    }
}

impl From<std::io::Error> for ProxyHeaderError {
    fn from(e: std::io::Error) -> Self {
        ProxyHeaderError::Io(e)
    }
}

/// Logs a connection refused because it came from outside `trusted_proxies` on a
/// `proxy_protocol` listener: a warning (a balancer missing from the list is an outage), at
/// most one every 10 s with the count of those not logged (anyone can connect, and must not
/// be able to flood the log).
pub fn refused_untrusted(peer: SocketAddr) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static LAST_LOGGED: AtomicU64 = AtomicU64::new(0);
    static SUPPRESSED: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST_LOGGED.load(Relaxed);
    if now >= last.saturating_add(10)
        && LAST_LOGGED
            .compare_exchange(last, now, Relaxed, Relaxed)
            .is_ok()
    {
        let suppressed = SUPPRESSED.swap(0, Relaxed);
        tracing::warn!(
            %peer,
            suppressed,
            "server.proxy_protocol: connection from an address outside server.trusted_proxies \
             closed (only the listed load balancers may send a PROXY header; one line every \
             10 s at most)"
        );
    } else {
        SUPPRESSED.fetch_add(1, Relaxed);
    }
}

/// Reads the PROXY header at the start of `stream` (exactly its bytes) and gives the client's
/// address: the header's TCP source, or None for a header that names no client (`LOCAL`,
/// `UNKNOWN`, UNIX sockets, transports other than TCP). None is not "the connection's address"
/// folded in here: the caller must tell it apart, since that address is a trusted balancer's
/// and a trusted peer's `client_address_header` would be believed.
///
/// `max_v2_payload`: the longest v2 address block and TLVs read
/// (`server.proxy_protocol_max_bytes`); a longer one is refused before any of it is read.
pub async fn read_client<S>(
    stream: &mut S,
    max_v2_payload: usize,
) -> Result<Option<SocketAddr>, ProxyHeaderError>
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut header = vec![0u8; V1_MIN];
    stream.read_exact(&mut header).await?;
    if header.starts_with(V2_SIGNATURE) {
        header.resize(V2_FIXED, 0);
        stream.read_exact(&mut header[V1_MIN..]).await?;
        let payload = usize::from(u16::from_be_bytes([header[14], header[15]]));
        if payload > max_v2_payload {
            return Err(ProxyHeaderError::TooLong {
                len: payload,
                max: max_v2_payload,
            });
        }
        header.resize(V2_FIXED + payload, 0);
        stream.read_exact(&mut header[V2_FIXED..]).await?;
    } else if header.starts_with(b"PROXY ") {
        // Byte by byte up to the CRLF: nothing after the header may be consumed here (it is
        // the TLS handshake or the request), and a v1 header is short.
        while !header.ends_with(b"\r\n") {
            if header.len() == V1_MAX {
                return Err(ProxyHeaderError::Malformed(format!(
                    "a v1 header without CRLF in its first {V1_MAX} bytes"
                )));
            }
            header.push(stream.read_u8().await?);
        }
    } else {
        return Err(ProxyHeaderError::Malformed(
            "the connection does not start with a PROXY header".to_owned(),
        ));
    }
    client_of(&header)
}

/// The client a whole header (`bytes`, nothing after it) names (None: none).
fn client_of(bytes: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    use ppp::v1::Addresses as V1;
    use ppp::v2::{Addresses as V2, Command, Protocol};

    let malformed = |e: &dyn std::fmt::Display| ProxyHeaderError::Malformed(e.to_string());
    match ppp::HeaderResult::parse(bytes) {
        // The ports are decimal digits: `ppp` reads them with `u16::from_str`, which also
        // takes a sign (`+80`); no address of either family has a `+` in it.
        ppp::HeaderResult::V1(Ok(header))
            if !matches!(header.addresses, V1::Unknown) && bytes.contains(&b'+') =>
        {
            Err(ProxyHeaderError::Malformed(
                "a v1 header with a port that is not decimal digits".into(),
            ))
        }
        ppp::HeaderResult::V1(Ok(header)) if header.header.len() == bytes.len() => {
            Ok(match header.addresses {
                V1::Tcp4(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
                V1::Tcp6(a) => Some(SocketAddr::new(a.source_address.into(), a.source_port)),
                V1::Unknown => None,
            })
        }
        // Only TCP (`STREAM`) names the client of this TCP connection: a UDP or unspecified
        // transport names none, as the protocol lets a receiver choose and as haproxy does
        // (its addresses are not this connection's).
        ppp::HeaderResult::V2(Ok(header)) if header.len() == bytes.len() => {
            Ok(match (header.command, header.protocol, header.addresses) {
                (Command::Proxy, Protocol::Stream, V2::IPv4(a)) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                (Command::Proxy, Protocol::Stream, V2::IPv6(a)) => {
                    Some(SocketAddr::new(a.source_address.into(), a.source_port))
                }
                _ => None,
            })
        }
        ppp::HeaderResult::V1(Ok(_)) | ppp::HeaderResult::V2(Ok(_)) => Err(
            ProxyHeaderError::Malformed("the header's length disagrees with its bytes".into()),
        ),
        ppp::HeaderResult::V1(Err(e)) => Err(malformed(&e)),
        ppp::HeaderResult::V2(Err(e)) => Err(malformed(&e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut stream = bytes;
        let client = read_client(&mut stream, DEFAULT_MAX_V2_PAYLOAD).await;
        (client, stream.to_vec())
    }

    /// A v2 PROXY header for 203.0.113.7:51234 whose addresses and TLVs are `payload` bytes:
    /// the IPv4 addresses and one `PP2_TYPE_NOOP` TLV (type 4, RFC-less padding) filling the
    /// rest. `payload` ≥ 15.
    fn v2_padded(payload: usize) -> Vec<u8> {
        let mut addresses = vec![203, 0, 113, 7, 10, 0, 0, 1, 0xC8, 0x22, 0x01, 0xBB];
        let pad = payload - addresses.len() - 3;
        addresses.push(0x04);
        addresses.extend_from_slice(&u16::try_from(pad).unwrap().to_be_bytes());
        addresses.resize(payload, 0);
        v2(1, 0x11, &addresses)
    }

    /// The limit is the caller's (`server.proxy_protocol_max_bytes`): a header of exactly
    /// that many bytes of addresses and TLVs is read, one byte more is refused unread.
    #[tokio::test]
    async fn the_v2_payload_limit_is_the_callers() {
        for max in [MIN_MAX_V2_PAYLOAD, 300, DEFAULT_MAX_V2_PAYLOAD, 4096] {
            let fits = [v2_padded(max), b"GET".to_vec()].concat();
            let mut stream = &fits[..];
            let client = read_client(&mut stream, max).await.unwrap();
            assert_eq!(client, addr("203.0.113.7:51234"), "max {max}");
            assert_eq!(stream, b"GET", "max {max}");
            let over = v2_padded(max + 1);
            let mut stream = &over[..];
            let refused = read_client(&mut stream, max).await;
            assert!(
                matches!(refused, Err(ProxyHeaderError::TooLong { len, max: m }) if len == max + 1 && m == max),
                "max {max}: {refused:?}"
            );
            assert_eq!(stream.len(), max + 1, "max {max}: the payload was read");
        }
        let shown = ProxyHeaderError::TooLong { len: 301, max: 300 }.to_string();
        assert!(shown.contains("301") && shown.contains("server.proxy_protocol_max_bytes (300)"));
    }

    fn addr(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        out.extend_from_slice(&u16::try_from(addresses.len()).unwrap().to_be_bytes());
        out.extend_from_slice(addresses);
        out
    }

    #[tokio::test]
    async fn v1_headers_name_the_client_and_nothing_after_them_is_read() {
        let (client, rest) =
            read(b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 443\r\nGET / HTTP/1.1").await;
        assert_eq!(client.unwrap(), addr("203.0.113.7:51234"));
        assert_eq!(rest, b"GET / HTTP/1.1");
        let (client, rest) =
            read(b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 443\r\n\x16\x03").await;
        assert_eq!(client.unwrap(), addr("[2001:db8::7]:51234"));
        assert_eq!(rest, b"\x16\x03");
        let (client, rest) = read(b"PROXY UNKNOWN\r\nGET").await;
        assert_eq!(client.unwrap(), None);
        assert_eq!(rest, b"GET");
    }

    #[tokio::test]
    async fn v2_headers_name_the_client_local_names_none() {
        let mut ipv4 = vec![203, 0, 113, 7, 10, 0, 0, 5];
        ipv4.extend_from_slice(&51234u16.to_be_bytes());
        ipv4.extend_from_slice(&443u16.to_be_bytes());
        let mut bytes = v2(1, 0x11, &ipv4);
        bytes.extend_from_slice(b"GET");
        let (client, rest) = read(&bytes).await;
        assert_eq!(client.unwrap(), addr("203.0.113.7:51234"));
        assert_eq!(rest, b"GET");
        // TLVs after the addresses (an NLB's VPC endpoint id) are read and skipped.
        let mut with_tlv = ipv4.clone();
        with_tlv.extend_from_slice(&[0xEA, 0x00, 0x04, b'v', b'p', b'c', b'e']);
        let (client, rest) = read(&[v2(1, 0x11, &with_tlv), b"x".to_vec()].concat()).await;
        assert_eq!(client.unwrap(), addr("203.0.113.7:51234"));
        assert_eq!(rest, b"x");
        let mut ipv6 = Vec::new();
        ipv6.extend_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        ipv6.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        ipv6.extend_from_slice(&[0xC8, 0x22, 0x01, 0xBB]);
        let (client, _) = read(&v2(1, 0x21, &ipv6)).await;
        assert_eq!(client.unwrap(), addr("[2001:db8::7]:51234"));
        // LOCAL (health checks) and an unspecified family: no client named.
        let (client, rest) = read(&[v2(0, 0x00, &[]), b"GET".to_vec()].concat()).await;
        assert_eq!(client.unwrap(), None);
        assert_eq!(rest, b"GET");
        let (client, _) = read(&v2(0, 0x11, &ipv4)).await;
        assert_eq!(client.unwrap(), None);
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        for bytes in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00\x00\x00",
            b"PROXY TCP4 203.0.113.7 10.0.0.5 51234\r\n",
            b"PROXY TCP4 203.0.113.300 10.0.0.5 51234 443\r\n",
            b"PROXY TCP6 203.0.113.7 10.0.0.5 51234 443\r\n",
            b"PROXY UDP4 203.0.113.7 10.0.0.5 51234 443\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 443\n\r\n",
        ] {
            assert!(
                matches!(read(bytes).await.0, Err(ProxyHeaderError::Malformed(_))),
                "{:?} accepted",
                String::from_utf8_lossy(bytes)
            );
        }
        // No CRLF within the v1 bound.
        let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(
            read(&long).await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        // Cut short: the socket's end is an I/O error.
        for cut in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.5"[..],
            &V2_SIGNATURE[..],
            b"PROX",
        ] {
            assert!(matches!(read(cut).await.0, Err(ProxyHeaderError::Io(_))));
        }
        // A v2 header announcing more than the bound is refused before it is read.
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert!(matches!(
            read(&huge).await.0,
            Err(ProxyHeaderError::TooLong {
                len: 65535,
                max: DEFAULT_MAX_V2_PAYLOAD
            })
        ));
        // A v2 header with addresses too short for its family.
        assert!(matches!(
            read(&v2(1, 0x11, &[203, 0, 113])).await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
        // Version 1 in a v2 signature.
        let mut v1sig = v2(1, 0x11, &[0; 12]);
        v1sig[12] = 0x11;
        assert!(matches!(
            read(&v1sig).await.0,
            Err(ProxyHeaderError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn v1_ports_with_a_sign_are_refused() {
        for bytes in [
            &b"PROXY TCP4 203.0.113.7 10.0.0.5 +51234 443\r\n"[..],
            b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 +443\r\n",
            b"PROXY TCP6 2001:db8::7 2001:db8::1 +51234 443\r\n",
        ] {
            assert!(
                matches!(read(bytes).await.0, Err(ProxyHeaderError::Malformed(_))),
                "{:?} accepted",
                String::from_utf8_lossy(bytes)
            );
        }
        // UNKNOWN's remainder is ignored, whatever it holds.
        let (client, _) = read(b"PROXY UNKNOWN +1 +2\r\n").await;
        assert_eq!(client.unwrap(), None);
    }

    #[tokio::test]
    async fn v2_transports_other_than_tcp_name_no_client() {
        let ipv4 = [203, 0, 113, 7, 10, 0, 0, 5, 0xC8, 0x22, 0x01, 0xBB];
        let mut ipv6 = [0u8; 36];
        ipv6[..16].copy_from_slice(
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        ipv6[32..].copy_from_slice(&[0xC8, 0x22, 0x01, 0xBB]);
        // Unspecified transport (0x10, 0x20) and UDP (0x12, 0x22): the addresses are not
        // this TCP connection's.
        for (family, addresses) in [
            (0x10, &ipv4[..]),
            (0x12, &ipv4[..]),
            (0x20, &ipv6[..]),
            (0x22, &ipv6[..]),
        ] {
            let (client, rest) = read(&[v2(1, family, addresses), b"GET".to_vec()].concat()).await;
            assert_eq!(client.unwrap(), None, "family {family:#04x}");
            assert_eq!(rest, b"GET");
        }
        // A UNIX socket (0x31 stream, 0x32 datagram; 216 bytes of paths): haproxy's for a
        // client of a UNIX-socket frontend, no IP client.
        for family in [0x31, 0x32] {
            let (client, rest) = read(&[v2(1, family, &[0; 216]), b"GET".to_vec()].concat()).await;
            assert_eq!(client.unwrap(), None, "family {family:#04x}");
            assert_eq!(rest, b"GET");
        }
        // TCP (0x11, 0x21): the source.
        let (client, _) = read(&v2(1, 0x11, &ipv4)).await;
        assert_eq!(client.unwrap(), addr("203.0.113.7:51234"));
        let (client, _) = read(&v2(1, 0x21, &ipv6)).await;
        assert_eq!(client.unwrap(), addr("[2001:db8::7]:51234"));
    }
}

//! Which source and destination addresses a request may have for a reply to be possible at all.
//!
//! A reply goes back to the request's source, from the address the request was sent to. Some
//! requests can never be answered that way: the kernel refuses the send (port 0, a broadcast
//! source address), or would send it somewhere else than the client (an IPv4 address written in
//! IPv6, a reply from a broadcast address). They are dropped before any policy is looked up,
//! so that no spelling of an address can pick a policy, and counted by reason.
//!
//! Rules, from the RFCs:
//! - Port 0 is reserved (RFC 768 makes the source port optional: 0 means "no reply port"), and
//!   Linux refuses to send to it (EINVAL).
//! - An IPv4 source must be unicast: not 0.0.0.0/8 ("this network", only a source while a host
//!   boots and cannot take a reply, RFC 1122 3.2.1.3), not multicast (224.0.0.0/4, RFC 1112), not
//!   the limited broadcast 255.255.255.255. A subnet's broadcast address cannot be told from its
//!   spelling; the kernel drops such sources from the wire as martians.
//! - An IPv6 source must be unicast: not `::` (RFC 4291 2.5.2: never a destination), not
//!   multicast (ff00::/8, RFC 4291 2.7: never a source).
//! - IPv4 in IPv6: IPv4-mapped `::ffff:0:0/96` (RFC 4291 2.5.5.2) stands for an IPv4 node and
//!   never appears on an IPv6 wire; IPv4-compatible `::/96` (RFC 4291 2.5.5.1) is deprecated and
//!   no longer used by any transition mechanism. Either would let a packet borrow an IPv4
//!   address's policy (`::ffff:127.0.0.1` is not loopback). The exceptions inside `::/96` are
//!   `::` (unspecified, above) and `::1`, the IPv6 loopback address, which is served.
//! - The destination must be a unicast address of ours: not multicast, not the limited
//!   broadcast, and not a subnet broadcast. Whether an IPv4 destination was a broadcast of ours
//!   only the kernel knows: in `IP_PKTINFO` it reports the header's destination (`ipi_addr`) and
//!   the local address it would reply from (`ipi_spec_dst`), which is the destination itself
//!   exactly when the route is a local unicast one (Linux `fib_compute_spec_dst`).
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Where a request was sent, as the kernel reported it with the datagram.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Destination {
    /// The destination address in the IP header.
    pub addr: IpAddr,
    /// IPv4 only: the local unicast address the kernel would answer from (`ipi_spec_dst`), if it
    /// said; it differs from `addr` when `addr` was a broadcast or multicast address.
    pub spec_dst: Option<Ipv4Addr>,
}

/// Why a request can never be answered.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum Unanswerable {
    /// Source port 0.
    SourcePortZero = 0,
    /// An IPv4-mapped or IPv4-compatible IPv6 source.
    SourceIpv4InIpv6 = 1,
    /// A multicast, broadcast or unspecified source address.
    SourceNotUnicast = 2,
    /// Sent to a multicast or broadcast address.
    DestinationNotUnicast = 3,
}

impl Unanswerable {
    pub const ALL: [Unanswerable; 4] = [
        Unanswerable::SourcePortZero,
        Unanswerable::SourceIpv4InIpv6,
        Unanswerable::SourceNotUnicast,
        Unanswerable::DestinationNotUnicast,
    ];
}

fn v4_unicast(a: Ipv4Addr) -> bool {
    a.octets()[0] != 0 && !a.is_multicast() && !a.is_broadcast()
}

/// `::ffff:0:0/96`, or `::/96` but for `::` and `::1`.
fn v4_in_v6(a: Ipv6Addr) -> bool {
    let s = a.segments();
    let high_zero = s[..5] == [0; 5];
    let mapped = high_zero && s[5] == 0xffff;
    let compatible = high_zero && s[5] == 0 && u128::from(a) > 1;
    mapped || compatible
}

/// Whether a reply to `source` sent from `destination` is possible; the reason if not.
#[inline]
pub fn check_addresses(source: SocketAddr, destination: Option<Destination>) -> Result<(), Unanswerable> {
    match source.ip() {
        IpAddr::V4(a) if !v4_unicast(a) => return Err(Unanswerable::SourceNotUnicast),
        IpAddr::V6(a) if a.is_unspecified() || a.is_multicast() => return Err(Unanswerable::SourceNotUnicast),
        IpAddr::V6(a) if v4_in_v6(a) => return Err(Unanswerable::SourceIpv4InIpv6),
        _ => {}
    }
    if source.port() == 0 {
        return Err(Unanswerable::SourcePortZero);
    }
    if let Some(d) = destination {
        let unicast = match d.addr {
            IpAddr::V4(a) => v4_unicast(a) && d.spec_dst.is_none_or(|s| s == a),
            IpAddr::V6(a) => !a.is_multicast() && !a.is_unspecified(),
        };
        if !unicast {
            return Err(Unanswerable::DestinationNotUnicast);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use Unanswerable::*;

    fn src(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn dst(addr: &str, spec: Option<&str>) -> Option<Destination> {
        Some(Destination {
            addr: addr.parse().unwrap(),
            spec_dst: spec.map(|s| s.parse().unwrap()),
        })
    }

    #[test]
    fn ordinary_clients_are_answerable() {
        for s in [
            "192.0.2.1:123",
            "127.0.0.1:40000",
            "240.0.0.1:5",
            "[2001:db8::1]:123",
            "[::1]:40000",
            "[64:ff9b::c000:201]:123",
            "[fe80::1%2]:123",
        ] {
            assert_eq!(check_addresses(src(s), None), Ok(()), "{s}");
        }
        assert_eq!(
            check_addresses(src("192.0.2.1:1"), dst("127.0.0.1", Some("127.0.0.1"))),
            Ok(())
        );
        assert_eq!(check_addresses(src("192.0.2.1:1"), dst("127.0.4.9", None)), Ok(()));
        assert_eq!(check_addresses(src("[2001:db8::1]:1"), dst("::1", None)), Ok(()));
    }

    #[test]
    fn sources_that_cannot_take_a_reply() {
        for (s, why) in [
            ("192.0.2.1:0", SourcePortZero),
            ("[2001:db8::1]:0", SourcePortZero),
            ("[::1]:0", SourcePortZero),
            ("0.0.0.0:123", SourceNotUnicast),
            ("0.1.2.3:123", SourceNotUnicast),
            ("224.0.0.1:123", SourceNotUnicast),
            ("239.255.255.255:123", SourceNotUnicast),
            ("255.255.255.255:123", SourceNotUnicast),
            ("[::]:123", SourceNotUnicast),
            ("[ff02::1]:123", SourceNotUnicast),
            ("[::ffff:127.0.0.1]:123", SourceIpv4InIpv6),
            ("[::ffff:192.0.2.1]:0", SourceIpv4InIpv6),
            ("[::ffff:0.0.0.0]:123", SourceIpv4InIpv6),
            ("[::127.0.0.1]:123", SourceIpv4InIpv6),
            ("[::2]:123", SourceIpv4InIpv6),
            ("[::192.0.2.1]:123", SourceIpv4InIpv6),
        ] {
            assert_eq!(check_addresses(src(s), None), Err(why), "{s}");
        }
        // Just outside the two /96 blocks: ordinary IPv6.
        for s in ["[::1:0:0:1]:1", "[0:0:0:1::1]:1", "[::fffe:0:1]:1", "[::1:ffff:0:1]:1"] {
            assert_eq!(check_addresses(src(s), None), Ok(()), "{s}");
        }
    }

    #[test]
    fn destinations_that_are_not_ours_alone() {
        let c = src("192.0.2.1:123");
        for (d, spec) in [
            ("255.255.255.255", None),
            ("224.0.1.1", None),
            ("224.0.1.1", Some("192.0.2.9")),
            // A subnet broadcast: only the kernel's choice of reply address gives it away.
            ("127.255.255.255", Some("127.0.0.1")),
            ("192.0.2.255", Some("192.0.2.9")),
        ] {
            assert_eq!(check_addresses(c, dst(d, spec)), Err(DestinationNotUnicast), "{d}");
        }
        assert_eq!(
            check_addresses(src("[2001:db8::1]:123"), dst("ff02::101", None)),
            Err(DestinationNotUnicast)
        );
    }
}

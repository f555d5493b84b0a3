//! Sans-IO Ethernet frames for the AF_XDP path: which frames are plainly NTP requests for us, and
//! the reply built over the request in the same frame.
//!
//! [`classify`] holds the header rules; the XDP program ([`super::program`]) applies exactly the
//! same rules in the kernel, reason for reason, so a frame either side refuses goes on to the
//! kernel's own UDP stack untouched. [`parse`] adds what the program cannot cheaply check (the
//! IPv4 header and UDP checksums): a frame that fails them was redirected but is dropped here, as
//! the kernel would have dropped it.
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
pub const UDP_HLEN: usize = 8;
/// The shortest NTP packet (RFC 5905 header without extensions or MAC).
pub const NTP_MIN: usize = 48;

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// IEEE 802.1Q; an 802.1ad outer tag (0x88a8) or a second tag is not "at most one tag".
pub const ETHERTYPE_VLAN: u16 = 0x8100;
pub const IPPROTO_UDP: u8 = 17;

/// The addresses and port the server answers on; a family without an address is never taken.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Target {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
    pub port: u16,
}

/// Why a frame is left to the kernel (or, for the checksum reasons, dropped after redirection).
/// The discriminants are the XDP program's counter indices.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u32)]
pub enum Pass {
    /// Shorter than the headers plus a 48-byte NTP packet.
    Short = 2,
    /// Destination or source MAC is a group (multicast/broadcast) address.
    GroupMac = 3,
    /// Neither IPv4 nor IPv6 (ARP, LLDP, ...), or more than one VLAN tag.
    Ethertype = 4,
    /// IPv4 with options (IHL != 5) or the reserved flag set, or the version field disagrees
    /// with the ethertype.
    IpHeader = 5,
    /// An IPv4 fragment (MF set or a non-zero offset).
    Fragment = 6,
    /// Not UDP right after the IP header: ICMP, TCP, IPv6 extension headers (ND is ICMPv6).
    NotUdp = 7,
    /// Not to the configured address.
    Address = 8,
    /// Not to the configured port.
    Port = 9,
    /// IP and UDP lengths disagree, run past the frame, or leave less than 48 bytes of NTP.
    Length = 10,
    /// Only in [`parse`]: the IPv4 header checksum is wrong.
    IpChecksum = 11,
    /// Only in [`parse`]: the UDP checksum is wrong (or zero over IPv6).
    UdpChecksum = 12,
}

/// Counter indices of the program beside the [`Pass`] reasons.
pub const COUNT_REDIRECTED: u32 = 0;
/// The frame matched but no AF_XDP socket was bound on its RX queue; the kernel got it.
pub const COUNT_NO_SOCKET: u32 = 1;
/// Number of counter slots (the highest index + 1).
pub const COUNTERS: u32 = 13;

/// A frame that is plainly an NTP request for us: where its parts are and who sent it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Request {
    /// Offset of the IP header (14, or 18 behind a VLAN tag).
    pub l3: usize,
    pub ipv6: bool,
    /// Offset of the NTP payload; the reply is written from here.
    pub payload: usize,
    pub payload_len: usize,
    pub peer: SocketAddr,
    pub destination: IpAddr,
}

impl Request {
    fn l4(&self) -> usize {
        self.payload - UDP_HLEN
    }
}

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn put16(f: &mut [u8], at: usize, v: u16) {
    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The header rules, exactly as the XDP program applies them and in the same order.
pub fn classify(f: &[u8], t: &Target) -> Result<Request, Pass> {
    if f.len() < ETH_HLEN {
        return Err(Pass::Short);
    }
    if f[0] & 1 != 0 || f[6] & 1 != 0 {
        return Err(Pass::GroupMac);
    }
    let mut l3 = ETH_HLEN;
    let mut ethertype = be16(f, 12);
    if ethertype == ETHERTYPE_VLAN {
        if f.len() < ETH_HLEN + VLAN_HLEN {
            return Err(Pass::Short);
        }
        ethertype = be16(f, 16);
        l3 += VLAN_HLEN;
    }
    let ipv6 = match ethertype {
        ETHERTYPE_IPV4 => false,
        ETHERTYPE_IPV6 => true,
        _ => return Err(Pass::Ethertype),
    };
    let ip_hlen = if ipv6 { IPV6_HLEN } else { IPV4_HLEN };
    let l4 = l3 + ip_hlen;
    let payload = l4 + UDP_HLEN;
    if f.len() < payload + NTP_MIN {
        return Err(Pass::Short);
    }
    let ip = &f[l3..];
    // The IP datagram's length as the IP header says (without the Ethernet padding).
    let ip_len;
    let (peer_ip, destination) = if !ipv6 {
        // Version 4, IHL 5, and the reserved flag clear (RFC 791).
        if ip[0] != 0x45 || ip[6] & 0x80 != 0 {
            return Err(Pass::IpHeader);
        }
        if be16(ip, 6) & 0x3fff != 0 {
            return Err(Pass::Fragment);
        }
        if ip[9] != IPPROTO_UDP {
            return Err(Pass::NotUdp);
        }
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        if t.v4 != Some(dst) {
            return Err(Pass::Address);
        }
        ip_len = be16(ip, 2) as usize;
        let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        (IpAddr::V4(src), IpAddr::V4(dst))
    } else {
        if ip[0] & 0xf0 != 0x60 {
            return Err(Pass::IpHeader);
        }
        if ip[6] != IPPROTO_UDP {
            return Err(Pass::NotUdp);
        }
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
        if t.v6 != Some(dst) {
            return Err(Pass::Address);
        }
        ip_len = IPV6_HLEN + be16(ip, 4) as usize;
        let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
        (IpAddr::V6(src), IpAddr::V6(dst))
    };
    if be16(f, l4 + 2) != t.port {
        return Err(Pass::Port);
    }
    let udp_len = be16(f, l4 + 4) as usize;
    if ip_len < ip_hlen + UDP_HLEN + NTP_MIN || l3 + ip_len > f.len() || udp_len != ip_len - ip_hlen {
        return Err(Pass::Length);
    }
    Ok(Request {
        l3,
        ipv6,
        payload,
        payload_len: udp_len - UDP_HLEN,
        peer: SocketAddr::new(peer_ip, be16(f, l4)),
        destination,
    })
}

/// [`classify`] and the checksums: the request a worker answers.
pub fn parse(f: &[u8], t: &Target) -> Result<Request, Pass> {
    let r = classify(f, t)?;
    if !r.ipv6 && checksum(0, &f[r.l3..r.l3 + IPV4_HLEN]) != 0xffff {
        return Err(Pass::IpChecksum);
    }
    let stored = be16(f, r.l4() + 6);
    // Zero means "no checksum" over IPv4 only (RFC 768; RFC 8200 section 8.1).
    if (stored != 0 || r.ipv6) && udp_sum(f, &r, UDP_HLEN + r.payload_len) != 0xffff {
        return Err(Pass::UdpChecksum);
    }
    Ok(r)
}

/// One's-complement sum of `data` (as big-endian 16-bit words, odd byte padded) onto `sum`,
/// folded to 16 bits; not inverted.
pub fn checksum(sum: u32, data: &[u8]) -> u16 {
    // The one's-complement sum does not depend on byte order (RFC 1071 2.B): the words are
    // added in the machine's order, 32 bits at a time into 64 (no carry is lost before 2^32
    // words), and the folded result swapped once. What this costs on a frame is mostly its
    // loads, the first read of what the kernel just copied (perf annotate: 60% of the samples
    // wait on them): 0.21 us an NTS reply with 16-bit big-endian words, 0.18 us with these.
    let mut s = 0u64;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        s += u32::from_ne_bytes([w[0], w[1], w[2], w[3]]) as u64;
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        s += u16::from_ne_bytes([p[0], p[1]]) as u64;
    }
    if let [last] = pairs.remainder() {
        // The pad byte is zero: the last byte is the high half of a big-endian word.
        s += u16::from_ne_bytes([*last, 0]) as u64;
    }
    let native = fold(s) as u16;
    fold(u16::from_be_bytes(native.to_ne_bytes()) as u64 + sum as u64) as u16
}

/// `s` folded to 16 bits with end-around carries.
fn fold(mut s: u64) -> u64 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

/// The folded sum of the pseudo-header and the UDP datagram of `udp_len` bytes.
fn udp_sum(f: &[u8], r: &Request, udp_len: usize) -> u16 {
    let (addrs, proto_len) = if r.ipv6 {
        (&f[r.l3 + 8..r.l3 + 40], udp_len as u32 + IPPROTO_UDP as u32)
    } else {
        (&f[r.l3 + 12..r.l3 + 20], udp_len as u32 + IPPROTO_UDP as u32)
    };
    let pseudo = checksum(proto_len, addrs) as u32;
    checksum(pseudo, &f[r.l4()..r.l4() + udp_len])
}

/// Turns the request frame into the reply, whose `reply_len` bytes of NTP payload the caller has
/// already written at `r.payload`: MACs, IP addresses and ports swapped, `ttl` as TTL or hop
/// limit, lengths and checksums set. Returns the reply frame's length. A reply is never longer
/// than the request (amplification), so `reply_len` is capped at `r.payload_len`.
pub fn build_reply(f: &mut [u8], r: &Request, reply_len: usize, ttl: u8) -> usize {
    let reply_len = reply_len.min(r.payload_len);
    let (l3, l4) = (r.l3, r.l4());
    let udp_len = UDP_HLEN + reply_len;
    for i in 0..6 {
        f.swap(i, i + 6);
    }
    if r.ipv6 {
        // Version 6, traffic class and flow label zero: the reply is a new flow of ours.
        f[l3..l3 + 4].copy_from_slice(&[0x60, 0, 0, 0]);
        put16(f, l3 + 4, udp_len as u16);
        f[l3 + 7] = ttl;
        for i in 0..16 {
            f.swap(l3 + 8 + i, l3 + 24 + i);
        }
    } else {
        // TOS zero, identification zero with DF set (an atomic datagram, RFC 6864).
        f[l3 + 1] = 0;
        put16(f, l3 + 2, (IPV4_HLEN + udp_len) as u16);
        put16(f, l3 + 4, 0);
        put16(f, l3 + 6, 0x4000);
        f[l3 + 8] = ttl;
        put16(f, l3 + 10, 0);
        for i in 0..4 {
            f.swap(l3 + 12 + i, l3 + 16 + i);
        }
        let sum = !checksum(0, &f[l3..l3 + IPV4_HLEN]);
        put16(f, l3 + 10, sum);
    }
    for i in 0..2 {
        f.swap(l4 + i, l4 + 2 + i);
    }
    put16(f, l4 + 4, udp_len as u16);
    put16(f, l4 + 6, 0);
    let sum = !udp_sum(f, r, udp_len);
    // A computed zero is sent as all ones: zero means "none" (RFC 768).
    put16(f, l4 + 6, if sum == 0 { 0xffff } else { sum });
    r.payload + reply_len
}

/// A new IPv4 UDP frame from `src` (MAC `macs.0`) to `dst` (MAC `macs.1`) carrying `payload`,
/// as a load generator sends: written as the frame `dst` would have sent to `src`, then turned
/// around by [`build_reply`], so that one piece of code sets lengths and checksums. Returns the
/// frame's length; `f` must hold the headers and the payload.
pub fn build_datagram(
    f: &mut [u8],
    macs: ([u8; 6], [u8; 6]),
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
    ttl: u8,
) -> usize {
    let (l3, l4) = (ETH_HLEN, ETH_HLEN + IPV4_HLEN);
    let start = l4 + UDP_HLEN;
    f[..6].copy_from_slice(&macs.0);
    f[6..12].copy_from_slice(&macs.1);
    put16(f, 12, 0x0800);
    f[l3] = 0x45;
    f[l3 + 9] = IPPROTO_UDP;
    f[l3 + 12..l3 + 16].copy_from_slice(&dst.ip().octets());
    f[l3 + 16..l3 + 20].copy_from_slice(&src.ip().octets());
    put16(f, l4, dst.port());
    put16(f, l4 + 2, src.port());
    f[start..start + payload.len()].copy_from_slice(payload);
    let turned = Request {
        l3,
        ipv6: false,
        payload: start,
        payload_len: payload.len(),
        peer: SocketAddr::V4(dst),
        destination: IpAddr::V4(*src.ip()),
    };
    build_reply(f, &turned, payload.len(), ttl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SERVER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 1);
    const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 2);
    const SMAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const CMAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
    const TARGET: Target = Target {
        v4: Some(SERVER4),
        v6: Some(SERVER6),
        port: 123,
    };

    /// The RFC 1071 sum the slow, obvious way: 16-bit words added in a u64, folded once at end.
    fn naive_sum(bytes: &[u8]) -> u16 {
        let mut total: u64 = 0;
        let mut i = 0;
        while i < bytes.len() {
            let hi = bytes[i] as u64;
            let lo = if i + 1 < bytes.len() { bytes[i + 1] as u64 } else { 0 };
            total += hi * 256 + lo;
            i += 2;
        }
        while total >> 16 != 0 {
            total = (total & 0xffff) + (total >> 16);
        }
        !(total as u16)
    }

    fn naive_udp_checksum(src: &[u8], dst: &[u8], udp: &[u8]) -> u16 {
        let mut p = Vec::new();
        p.extend_from_slice(src);
        p.extend_from_slice(dst);
        if src.len() == 16 {
            p.extend_from_slice(&(udp.len() as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 17]);
        } else {
            p.extend_from_slice(&[0, 17]);
            p.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        }
        let mut u = udp.to_vec();
        u[6] = 0;
        u[7] = 0;
        p.extend_from_slice(&u);
        match naive_sum(&p) {
            0 => 0xffff,
            s => s,
        }
    }

    /// A request frame as a client's kernel would send it, checksums filled in naively.
    fn frame(ipv6: bool, vlan: bool, payload: &[u8], sport: u16) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&SMAC);
        f.extend_from_slice(&CMAC);
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        }
        let udp_len = (8 + payload.len()) as u16;
        let mut udp = Vec::new();
        udp.extend_from_slice(&sport.to_be_bytes());
        udp.extend_from_slice(&123u16.to_be_bytes());
        udp.extend_from_slice(&udp_len.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.extend_from_slice(payload);
        if ipv6 {
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0x01, 0x23, 0x45]);
            f.extend_from_slice(&udp_len.to_be_bytes());
            f.extend_from_slice(&[17, 64]);
            f.extend_from_slice(&CLIENT6.octets());
            f.extend_from_slice(&SERVER6.octets());
            let c = naive_udp_checksum(&CLIENT6.octets(), &SERVER6.octets(), &udp);
            udp[6..8].copy_from_slice(&c.to_be_bytes());
        } else {
            f.extend_from_slice(&[0x08, 0x00]);
            let mut ip = vec![0x45, 0];
            ip.extend_from_slice(&(20 + udp_len).to_be_bytes());
            ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 17, 0, 0]);
            ip.extend_from_slice(&CLIENT4.octets());
            ip.extend_from_slice(&SERVER4.octets());
            let c = naive_sum(&ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend_from_slice(&ip);
            let c = naive_udp_checksum(&CLIENT4.octets(), &SERVER4.octets(), &udp);
            udp[6..8].copy_from_slice(&c.to_be_bytes());
        }
        f.extend_from_slice(&udp);
        f
    }

    fn ntp() -> Vec<u8> {
        let mut p = vec![0u8; 48];
        p[0] = 0x23;
        p[40..48].copy_from_slice(&0x1122334455667788u64.to_be_bytes());
        p
    }

    #[test]
    fn takes_requests_on_both_families_with_and_without_a_tag() {
        for ipv6 in [false, true] {
            for vlan in [false, true] {
                let f = frame(ipv6, vlan, &ntp(), 40000);
                let r = parse(&f, &TARGET).unwrap_or_else(|e| panic!("{ipv6} {vlan}: {e:?}"));
                assert_eq!(r.l3, if vlan { 18 } else { 14 });
                assert_eq!(r.payload_len, 48);
                assert_eq!(&f[r.payload..r.payload + 48], &ntp()[..]);
                let (peer, dst) = if ipv6 {
                    (IpAddr::V6(CLIENT6), IpAddr::V6(SERVER6))
                } else {
                    (IpAddr::V4(CLIENT4), IpAddr::V4(SERVER4))
                };
                assert_eq!(r.peer, SocketAddr::new(peer, 40000));
                assert_eq!(r.destination, dst);
            }
        }
    }

    /// A generator's request, built from nothing, is what the hand-made frame is: the server's
    /// parser takes it, and its reply turned around again parses as for the client.
    #[test]
    fn a_built_datagram_is_a_request_the_server_takes() {
        let (client, server) = (SocketAddrV4::new(CLIENT4, 40000), SocketAddrV4::new(SERVER4, 123));
        let mut f = vec![0u8; 2048];
        let len = build_datagram(&mut f, (CMAC, SMAC), client, server, &ntp(), 64);
        assert_eq!(len, ETH_HLEN + IPV4_HLEN + UDP_HLEN + 48);
        let r = parse(&f[..len], &TARGET).unwrap();
        assert_eq!(r.peer, SocketAddr::V4(client));
        let back = build_reply(&mut f, &r, 48, 64);
        let to_client = Target {
            v4: Some(CLIENT4),
            v6: None,
            port: 40000,
        };
        let r = parse(&f[..back], &to_client).unwrap();
        assert_eq!(r.peer, SocketAddr::V4(server));
    }

    #[test]
    fn ethernet_padding_is_allowed() {
        let mut f = frame(false, false, &ntp(), 1);
        f.extend_from_slice(&[0; 6]);
        assert!(parse(&f, &TARGET).is_ok());
    }

    #[test]
    fn each_rule_refuses_with_its_reason() {
        let v4 = frame(false, false, &ntp(), 40000);
        let v6 = frame(true, false, &ntp(), 40000);
        let cases: Vec<(Vec<u8>, Pass)> = vec![
            (v4[..60].to_vec(), Pass::Short),
            (
                {
                    let mut f = v4.clone();
                    f[0] = 0xff;
                    f
                },
                Pass::GroupMac,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[6] |= 1;
                    f
                },
                Pass::GroupMac,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[12..14].copy_from_slice(&[0x08, 0x06]);
                    f
                },
                Pass::Ethertype,
            ),
            (
                {
                    let mut f = frame(false, true, &ntp(), 1);
                    f[16..18].copy_from_slice(&[0x81, 0]);
                    f
                },
                Pass::Ethertype,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[12..14].copy_from_slice(&[0x88, 0xa8]);
                    f
                },
                Pass::Ethertype,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[14] = 0x46;
                    f
                },
                Pass::IpHeader,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[14] = 0x65;
                    f
                },
                Pass::IpHeader,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[20] |= 0x80;
                    f
                },
                Pass::IpHeader,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[20] = 0x20;
                    f
                },
                Pass::Fragment,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[21] = 0x01;
                    f
                },
                Pass::Fragment,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[23] = 1;
                    f
                },
                Pass::NotUdp,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[33] = 9;
                    f
                },
                Pass::Address,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[37] = 124;
                    f
                },
                Pass::Port,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[17] += 1;
                    f
                },
                Pass::Length,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[39] -= 1;
                    f
                },
                Pass::Length,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[24] ^= 1;
                    f
                },
                Pass::IpChecksum,
            ),
            (
                {
                    let mut f = v4.clone();
                    f[50] ^= 1;
                    f
                },
                Pass::UdpChecksum,
            ),
            (
                {
                    let mut f = v6.clone();
                    f[14] = 0x40;
                    f
                },
                Pass::IpHeader,
            ),
            (
                {
                    let mut f = v6.clone();
                    f[20] = 0;
                    f
                },
                Pass::NotUdp,
            ),
            (
                {
                    let mut f = v6.clone();
                    f[20] = 58;
                    f
                },
                Pass::NotUdp,
            ),
            (
                {
                    let mut f = v6.clone();
                    f[53] = 3;
                    f
                },
                Pass::Address,
            ),
            (
                {
                    let mut f = v6.clone();
                    f[57] = 1;
                    f
                },
                Pass::Port,
            ),
            (
                {
                    let mut f = v6.clone();
                    f[19] = 57;
                    f
                },
                Pass::Length,
            ),
            (
                {
                    let mut f = v6.clone();
                    f[60..62].copy_from_slice(&[0, 0]);
                    f
                },
                Pass::UdpChecksum,
            ),
            (
                {
                    let mut f = v6.clone();
                    f[70] ^= 0x80;
                    f
                },
                Pass::UdpChecksum,
            ),
        ];
        for (i, (f, want)) in cases.iter().enumerate() {
            assert_eq!(parse(f, &TARGET), Err(*want), "case {i}");
        }
        let only_v4 = Target { v6: None, ..TARGET };
        assert_eq!(parse(&v6, &only_v4), Err(Pass::Address));
        let short_payload = frame(false, false, &[0x23; 47], 1);
        assert_eq!(parse(&short_payload, &TARGET), Err(Pass::Short));
        let mut padded = frame(false, false, &[0x23; 47], 1);
        padded.push(0);
        assert_eq!(parse(&padded, &TARGET), Err(Pass::Length));
    }

    #[test]
    fn ipv4_without_udp_checksum_is_taken() {
        let mut f = frame(false, false, &ntp(), 40000);
        f[40..42].copy_from_slice(&[0, 0]);
        assert!(parse(&f, &TARGET).is_ok());
    }

    /// The reply must look exactly like a frame the client's side would have built for the
    /// swapped flow: the same bytes as `frame`'s independent construction, with our header fields.
    #[test]
    fn reply_is_the_mirrored_frame_with_valid_checksums() {
        for ipv6 in [false, true] {
            for vlan in [false, true] {
                let mut f = frame(ipv6, vlan, &[0x23; 68], 40000);
                let r = parse(&f, &TARGET).unwrap();
                let reply: Vec<u8> = (0..48).map(|i| i as u8 ^ 0x5a).collect();
                f[r.payload..r.payload + 48].copy_from_slice(&reply);
                let n = build_reply(&mut f, &r, 48, 64);
                let f = &f[..n];
                assert_eq!(n, r.payload + 48);
                assert_eq!(&f[0..6], &CMAC);
                assert_eq!(&f[6..12], &SMAC);
                let ip = &f[r.l3..];
                let udp = &f[r.l3 + if ipv6 { 40 } else { 20 }..];
                assert_eq!(be16(udp, 0), 123);
                assert_eq!(be16(udp, 2), 40000);
                assert_eq!(be16(udp, 4), 56);
                let (src, dst) = if ipv6 {
                    assert_eq!(be16(ip, 4), 56);
                    assert_eq!(ip[7], 64);
                    (&ip[8..24], &ip[24..40])
                } else {
                    assert_eq!(be16(ip, 2), 76);
                    assert_eq!(ip[8], 64);
                    assert_eq!(be16(ip, 6), 0x4000);
                    let mut h = ip[..20].to_vec();
                    let stored = be16(&h, 10);
                    h[10] = 0;
                    h[11] = 0;
                    assert_eq!(stored, naive_sum(&h));
                    (&ip[12..16], &ip[16..20])
                };
                if ipv6 {
                    assert_eq!(src, SERVER6.octets());
                    assert_eq!(dst, CLIENT6.octets());
                } else {
                    assert_eq!(src, SERVER4.octets());
                    assert_eq!(dst, CLIENT4.octets());
                }
                assert_eq!(be16(udp, 6), naive_udp_checksum(src, dst, &udp[..56]));
                assert_eq!(&udp[8..56], &reply[..]);
            }
        }
    }

    #[test]
    fn reply_is_never_longer_than_the_request() {
        let mut f = frame(false, false, &ntp(), 1);
        let r = parse(&f, &TARGET).unwrap();
        assert_eq!(build_reply(&mut f, &r, 200, 64), r.payload + 48);
    }

    fn any_frame() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..200),
            // Valid requests with a few bytes changed: the interesting boundary.
            (
                any::<bool>(),
                any::<bool>(),
                proptest::collection::vec((0usize..70, any::<u8>(), any::<bool>()), 0..4),
                0usize..130,
                any::<bool>()
            )
                .prop_map(|(v6, vlan, edits, cut, fix)| {
                    let mut f = frame(v6, vlan, &ntp(), 5000);
                    for (at, b, flip) in edits {
                        if at < f.len() {
                            // A single flipped bit finds the boundaries; a whole byte the rest.
                            f[at] = if flip { f[at] ^ (1 << (b % 8)) } else { b };
                        }
                    }
                    f.truncate(cut.max(60));
                    if fix {
                        fix_checksums(&mut f, v6, if vlan { 18 } else { 14 });
                    }
                    f
                }),
        ]
    }

    /// Makes the checksums right again after header edits, so the proptest also reaches the
    /// header rules and not only the checksum checks.
    fn fix_checksums(f: &mut [u8], ipv6: bool, l3: usize) {
        let l4 = l3 + if ipv6 { 40 } else { 20 };
        if f.len() < l4 + 8 {
            return;
        }
        if !ipv6 {
            f[l3 + 10] = 0;
            f[l3 + 11] = 0;
            let c = naive_sum(&f[l3..l4]);
            f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        let len = be16(f, l4 + 4) as usize;
        if len < 8 || l4 + len > f.len() {
            return;
        }
        let (src, dst) = if ipv6 {
            (f[l3 + 8..l3 + 24].to_vec(), f[l3 + 24..l3 + 40].to_vec())
        } else {
            (f[l3 + 12..l3 + 16].to_vec(), f[l3 + 16..l3 + 20].to_vec())
        };
        let c = naive_udp_checksum(&src, &dst, &f[l4..l4 + len]);
        f[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    }

    /// What a plain request for TARGET is, decided independently of `classify`: rebuild the
    /// frame from the fields it claims and require byte equality.
    fn plainly_a_request(f: &[u8]) -> bool {
        let vlan = f.len() > 14 && f[12..14] == [0x81, 0x00];
        let l3 = if vlan { 18 } else { 14 };
        if f.len() < l3 + 1 {
            return false;
        }
        let ipv6 = f[l3] >> 4 == 6;
        let p = l3 + if ipv6 { 48 } else { 28 };
        if f.len() < p + 48 {
            return false;
        }
        let len = be16(f, p - 4) as usize;
        if len < 56 || p - 8 + len > f.len() {
            return false;
        }
        let mut want = frame(ipv6, vlan, &f[p..p - 8 + len], be16(f, p - 8));
        let got = &f[..want.len()];
        // Fields the rules do not look at come from the frame: MACs, the VLAN TCI, the v6
        // traffic class and flow label, the v4 TOS, ID, DF bit and TTL, the source address (the
        // handler's access rules judge it). The UDP checksum covers the source, so recompute.
        let mut keep = Vec::new();
        keep.push(0..12);
        if vlan {
            keep.push(14..16);
        }
        if ipv6 {
            keep.push(l3..l3 + 4);
            keep.extend([l3 + 7..l3 + 8, l3 + 8..l3 + 24]);
        } else {
            keep.extend([l3 + 1..l3 + 2, l3 + 4..l3 + 6, l3 + 8..l3 + 9, l3 + 12..l3 + 16]);
            want[l3 + 6] = (want[l3 + 6] & !0x40) | (f[l3 + 6] & 0x40);
        }
        for r in keep {
            want[r.clone()].copy_from_slice(&f[r]);
        }
        let (src, dst) = if ipv6 {
            (want[l3 + 8..l3 + 24].to_vec(), want[l3 + 24..l3 + 40].to_vec())
        } else {
            (want[l3 + 12..l3 + 16].to_vec(), want[l3 + 16..l3 + 20].to_vec())
        };
        let c = naive_udp_checksum(&src, &dst, &want[p - 8..]);
        want[p - 2..p].copy_from_slice(&c.to_be_bytes());
        if !ipv6 {
            want[l3 + 10] = 0;
            want[l3 + 11] = 0;
            let c = naive_sum(&want[l3..l3 + 20]);
            want[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
            // Over IPv4 a zero UDP checksum means none was computed.
            if be16(f, p - 2) == 0 {
                want[p - 2] = 0;
                want[p - 1] = 0;
            }
        }
        got == want && f[0] & 1 == 0 && f[6] & 1 == 0
    }

    /// Every single-bit change of every header bit (checksums made right again): taken only
    /// if the result is still plainly a request. Exhaustive where random edits are sparse.
    #[test]
    fn no_single_header_bit_makes_a_non_request_taken() {
        let mut taken = 0;
        for ipv6 in [false, true] {
            for vlan in [false, true] {
                let base = frame(ipv6, vlan, &ntp(), 5000);
                let l3 = if vlan { 18 } else { 14 };
                let headers = l3 + if ipv6 { 48 } else { 28 };
                for at in 0..headers {
                    for bit in 0..8 {
                        let mut f = base.clone();
                        f[at] ^= 1 << bit;
                        fix_checksums(&mut f, ipv6, l3);
                        if parse(&f, &TARGET).is_ok() {
                            assert!(plainly_a_request(&f), "bit {bit} of byte {at}: {f:02x?}");
                            taken += 1;
                        }
                    }
                }
            }
        }
        // The fields the rules ignore (MAC bits, TTL, source, ...) keep frames taken.
        assert!(taken > 100, "{taken}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn checksum_is_the_rfc_1071_sum(
            data in proptest::collection::vec(any::<u8>(), 0..600),
            sum in 0u32..0x2_0000,
        ) {
            let mut words = sum.to_be_bytes().to_vec();
            words.extend_from_slice(&data);
            prop_assert_eq!(checksum(sum, &data), !naive_sum(&words));
        }

        #[test]
        fn never_panics_and_takes_only_plain_requests(f in any_frame()) {
            let verdict = parse(&f, &TARGET);
            if verdict.is_ok() {
                prop_assert!(plainly_a_request(&f), "took {f:02x?}");
                let mut g = f.clone();
                let r = verdict.unwrap();
                let n = build_reply(&mut g, &r, 48, 64);
                prop_assert!(n <= f.len());
            }
            // classify is parse without the checksums: never stricter.
            if verdict.is_ok() {
                prop_assert!(classify(&f, &TARGET).is_ok());
            }
        }
    }
}

//! UDP socket setup for the workers and the raw pieces both backends share:
//! socket options, sockaddr conversion, and control-message (cmsg) parsing and building.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::proto::Destination;

/// Receive buffer per datagram: one byte more than the largest request we answer, so a longer
/// datagram is seen as too long instead of silently cut to an acceptable size.
pub const BUF_LEN: usize = crate::proto::MAX_REQUEST_LEN + 1;

/// Room for the cmsgs a received datagram carries (SO_TIMESTAMPNS + IP(V6)_PKTINFO +
/// SO_RXQ_OVFL), and for the one pktinfo we attach to a reply. In u64 words, so the buffer has
/// cmsghdr alignment.
pub const CTRL_WORDS: usize = 16;

/// Bytes of control data one received datagram can carry: the largest of its cmsgs' spaces
/// added up (the IPv6 pktinfo is the larger one).
pub const RECV_CONTROL_LEN: usize =
    cmsg_space(size_of::<libc::timespec>()) + cmsg_space(size_of::<libc::in6_pktinfo>()) + cmsg_space(size_of::<u32>());
const _: () = assert!(RECV_CONTROL_LEN <= CTRL_WORDS * 8);

/// CMSG_SPACE, computed at compile time (the libc one is not a const fn on every version).
pub const fn cmsg_space(payload: usize) -> usize {
    const fn align(n: usize) -> usize {
        (n + size_of::<usize>() - 1) & !(size_of::<usize>() - 1)
    }
    align(size_of::<libc::cmsghdr>()) + align(payload)
}

/// Options every worker socket gets.
#[derive(Clone, Copy, Debug)]
pub struct SocketOptions {
    pub recv_buffer: usize,
    pub send_buffer: usize,
    /// Blocking receives wake up this often to check for shutdown.
    pub read_timeout: Option<Duration>,
    pub nonblocking: bool,
}

fn setsockopt_int(sock: &Socket, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the fd is a live socket owned by `sock`; the option value is a c_int on the stack
    // whose size we pass, which is what the kernel reads for these integer options.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A UDP socket in the SO_REUSEPORT group for `addr`, with kernel receive timestamps and
/// destination-address reporting turned on.
pub fn bind_udp(addr: SocketAddr, opts: &SocketOptions) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // A separate v4 socket serves v4; mapped addresses would confuse the access table.
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_port(true)?;
    sock.set_recv_buffer_size(opts.recv_buffer)?;
    sock.set_send_buffer_size(opts.send_buffer)?;
    setsockopt_int(&sock, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
    // Each datagram then carries the socket's count of datagrams the kernel dropped (full
    // receive queue), so overload shows in the counters instead of as silence.
    setsockopt_int(&sock, libc::SOL_SOCKET, libc::SO_RXQ_OVFL, 1)?;
    if addr.is_ipv6() {
        setsockopt_int(&sock, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
    } else {
        setsockopt_int(&sock, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    }
    sock.set_read_timeout(opts.read_timeout)?;
    sock.set_nonblocking(opts.nonblocking)?;
    sock.bind(&SockAddr::from(addr))?;
    Ok(sock)
}

/// Attaches a classic BPF program to the socket's reuseport group (it then applies to every
/// socket of the group).
pub fn attach_reuseport_cbpf(sock: &Socket, prog: &[super::steering::Insn]) -> io::Result<()> {
    let filters: Vec<libc::sock_filter> = prog
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let fprog = libc::sock_fprog {
        len: filters.len() as u16,
        filter: filters.as_ptr().cast_mut(),
    };
    // SAFETY: fprog points at `filters`, alive for the call; the kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Where a request arrived, so the reply can leave from the same address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalAddr {
    V4 { addr: Ipv4Addr },
    V6 { addr: Ipv6Addr, ifindex: u32 },
}

/// What the kernel told us about one received datagram besides its bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct RecvInfo {
    /// CLOCK_REALTIME at reception, from SO_TIMESTAMPNS.
    pub rx_realtime_ns: Option<i64>,
    /// The address to reply from.
    pub local: Option<LocalAddr>,
    /// Where the datagram was sent, for the check that a reply is possible at all.
    pub destination: Option<Destination>,
    /// SO_RXQ_OVFL: datagrams this socket dropped so far (cumulative; absent while 0).
    pub rx_queue_drops: Option<u32>,
}

/// Turns the cumulative SO_RXQ_OVFL count of one socket into new drops.
#[derive(Clone, Copy, Debug, Default)]
pub struct RxQueueDrops {
    seen: u32,
}

impl RxQueueDrops {
    /// The drops not yet counted, given the count a datagram carried. The count only grows (it
    /// is read when each datagram is queued, and datagrams are read in queue order), wrapping
    /// after 2^32.
    #[inline]
    pub fn new_drops(&mut self, count: Option<u32>) -> u64 {
        let Some(c) = count else { return 0 };
        let d = c.wrapping_sub(self.seen);
        if d >= 1 << 31 {
            // Older than what we saw: nothing new.
            return 0;
        }
        self.seen = c;
        u64::from(d)
    }
}

/// Why the kernel refused to send one reply.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SendError {
    /// EINVAL and kin: the addresses of this message (port 0, a broadcast source, ...).
    Invalid,
    /// EPERM/EACCES: an egress firewall rule, or broadcast without SO_BROADCAST.
    NotPermitted,
    /// No route to the client.
    Unreachable,
    /// EAGAIN/ENOBUFS/ENOMEM: the send buffer or a queue is full.
    BufferFull,
    Other,
}

impl SendError {
    pub fn from_errno(errno: i32) -> SendError {
        match errno {
            libc::EINVAL | libc::EDESTADDRREQ | libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL => SendError::Invalid,
            libc::EPERM | libc::EACCES => SendError::NotPermitted,
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ENETDOWN | libc::EHOSTDOWN | libc::ECONNREFUSED => {
                SendError::Unreachable
            }
            libc::EAGAIN | libc::ENOBUFS | libc::ENOMEM => SendError::BufferFull,
            _ => SendError::Other,
        }
    }
}

/// Sends every message of `hdrs` with as few `sendmmsg` calls as possible. A message the kernel
/// refuses is counted by reason and skipped, and the rest still go out: `sendmmsg` stops at the
/// first failing message (returning how many went before it, or -1 when it is the first), so
/// the call after a partial send reports that message's error. A full buffer ends the batch
/// (the rest would meet the same buffer; waiting would stall the receive side), counted too.
/// Every call either sends, skips a message or ends the loop, so there are at most
/// `hdrs.len() + 1` calls (plus one retry per interrupted call). Returns how many were sent.
pub fn send_batch<H: super::Handler>(fd: libc::c_int, hdrs: &mut [libc::mmsghdr], handler: &mut H) -> usize {
    let (mut next, mut sent, mut retried) = (0usize, 0usize, false);
    while next < hdrs.len() {
        let left = &mut hdrs[next..];
        // SAFETY: the caller hands us initialised msghdrs that point at live buffers, for the
        // length of `left`.
        let rc = unsafe { libc::sendmmsg(fd, left.as_mut_ptr(), left.len() as libc::c_uint, 0) };
        if rc > 0 {
            next += rc as usize;
            sent += rc as usize;
            retried = false;
            continue;
        }
        let errno = if rc < 0 {
            io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        };
        if errno == libc::EINTR && !retried {
            retried = true;
            continue;
        }
        retried = false;
        let reason = SendError::from_errno(errno);
        if reason == SendError::BufferFull {
            handler.send_failed(reason, hdrs.len() - next);
            break;
        }
        handler.send_failed(reason, 1);
        next += 1;
    }
    sent
}

/// Reads a peer address the kernel wrote into a `sockaddr_storage`.
pub fn sockaddr_to_std(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, which is smaller than
            // sockaddr_storage and has weaker alignment; the length check confirms it was written.
            let sin = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes a socket address into a `sockaddr_storage`, returning the length to pass the kernel.
pub fn std_to_sockaddr(addr: SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    let sa = SockAddr::from(addr);
    let len = sa.len();
    // SAFETY: SockAddr holds a valid sockaddr of `len` bytes, and `len` never exceeds the size of
    // sockaddr_storage, which is exactly what socket2 stores it in.
    unsafe {
        std::ptr::copy_nonoverlapping(
            sa.as_ptr().cast::<u8>(),
            (storage as *mut libc::sockaddr_storage).cast::<u8>(),
            len as usize,
        );
    }
    len
}

/// Parses the control messages of one received datagram.
///
/// # Safety
/// `hdr` must be a msghdr the kernel has just filled in, whose `msg_control` points at a live
/// buffer of at least `msg_controllen` bytes.
pub unsafe fn parse_cmsgs(hdr: &libc::msghdr) -> RecvInfo {
    let mut info = RecvInfo::default();
    // SAFETY: the caller guarantees the control buffer and its length are valid; the CMSG
    // macros only walk within msg_controllen, and each payload is read with read_unaligned
    // after checking the message type, whose payload type is fixed by the kernel ABI.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let data = libc::CMSG_DATA(cmsg);
            match (c.cmsg_level, c.cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => {
                    let ts = std::ptr::read_unaligned(data.cast::<libc::timespec>());
                    info.rx_realtime_ns = Some(ts.tv_sec * 1_000_000_000 + ts.tv_nsec);
                }
                (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => {
                    info.rx_queue_drops = Some(std::ptr::read_unaligned(data.cast::<u32>()));
                }
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let pi = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                    let addr = Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr));
                    let spec_dst = Ipv4Addr::from(u32::from_be(pi.ipi_spec_dst.s_addr));
                    info.local = Some(LocalAddr::V4 { addr });
                    info.destination = Some(Destination {
                        addr: IpAddr::V4(addr),
                        // 0 when the kernel had no route to tell from.
                        spec_dst: (!spec_dst.is_unspecified()).then_some(spec_dst),
                    });
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let pi = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    let addr = Ipv6Addr::from(pi.ipi6_addr.s6_addr);
                    info.local = Some(LocalAddr::V6 {
                        addr,
                        ifindex: pi.ipi6_ifindex,
                    });
                    info.destination = Some(Destination {
                        addr: IpAddr::V6(addr),
                        spec_dst: None,
                    });
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    info
}

/// Writes the pktinfo cmsg that makes a reply leave from `local`, into `ctrl`; returns the
/// control length to put in the msghdr (0 when there is nothing to set).
pub fn build_pktinfo(ctrl: &mut [u64; CTRL_WORDS], local: Option<LocalAddr>) -> usize {
    let Some(local) = local else { return 0 };
    // SAFETY: `ctrl` is 8-byte aligned and 128 bytes long, more than CMSG_SPACE of either pktinfo
    // struct; we build a msghdr over it only so the CMSG macros compute the header position, and
    // write the payload with write_unaligned.
    unsafe {
        let mut hdr: libc::msghdr = zeroed();
        hdr.msg_control = ctrl.as_mut_ptr().cast();
        match local {
            LocalAddr::V4 { addr } => {
                let space = libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize;
                hdr.msg_controllen = space;
                let cmsg = libc::CMSG_FIRSTHDR(&hdr);
                (*cmsg).cmsg_level = libc::IPPROTO_IP;
                (*cmsg).cmsg_type = libc::IP_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as usize;
                let pi = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(addr).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>(), pi);
                space
            }
            LocalAddr::V6 { addr, ifindex } => {
                let space = libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as usize;
                hdr.msg_controllen = space;
                let cmsg = libc::CMSG_FIRSTHDR(&hdr);
                (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as usize;
                let pi = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr { s6_addr: addr.octets() },
                    ipi6_ifindex: ifindex,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::in6_pktinfo>(), pi);
                space
            }
        }
    }
}

/// The IP address of a peer, exactly as received: an IPv6 source stays IPv6 whatever it spells
/// (`::ffff:127.0.0.1` is not loopback), so that no source picks its policy by its spelling.
/// Such sources are dropped before policy anyway (`proto::check_addresses`).
pub fn peer_ip(addr: &SocketAddr) -> IpAddr {
    addr.ip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_source_keeps_its_family() {
        let a: SocketAddr = "[::ffff:127.0.0.1]:123".parse().unwrap();
        assert!(peer_ip(&a).is_ipv6());
        assert!(!peer_ip(&a).is_loopback());
        let b: SocketAddr = "127.0.0.1:123".parse().unwrap();
        assert_eq!(peer_ip(&b), IpAddr::V4(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn rx_queue_drops_count_once() {
        let mut d = RxQueueDrops::default();
        assert_eq!(d.new_drops(None), 0);
        assert_eq!(d.new_drops(Some(5)), 5);
        assert_eq!(d.new_drops(Some(5)), 0);
        assert_eq!(d.new_drops(Some(7)), 2);
        assert_eq!(d.new_drops(Some(6)), 0);
        let mut w = RxQueueDrops { seen: u32::MAX - 1 };
        assert_eq!(w.new_drops(Some(1)), 3);
    }

    /// Counts what `send_batch` reports.
    #[derive(Default)]
    struct Failures(Vec<(SendError, usize)>);

    impl super::super::Handler for Failures {
        fn begin_batch(&mut self) {}
        fn handle(&mut self, _: super::super::Datagram<'_>) -> usize {
            0
        }
        fn transmit_stamp(&mut self) -> super::super::TxStamp {
            super::super::TxStamp {
                realtime_ns: 0,
                ntp: crate::proto::NtpTimestamp::ZERO,
            }
        }
        fn stamp(&mut self, _: &mut [u8], _: i64, _: &super::super::TxStamp) {}
        fn send_failed(&mut self, reason: SendError, n: usize) {
            self.0.push((reason, n));
        }
        fn rx_queue_dropped(&mut self, _: u64) {}
        fn end_batch(&mut self, _: usize, _: usize) {}
        fn idle(&mut self) {}
    }

    #[test]
    fn a_refused_message_does_not_stop_the_batch() {
        let opts = SocketOptions {
            recv_buffer: 1 << 20,
            send_buffer: 1 << 20,
            read_timeout: Some(Duration::from_millis(500)),
            nonblocking: false,
        };
        let sender = bind_udp("127.0.0.1:0".parse().unwrap(), &opts).unwrap();
        let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let good = receiver.local_addr().unwrap();
        // Port 0 is refused with EINVAL: first, in the middle and last.
        let refused = [0usize, 30, 63];
        const N: usize = 64;
        let mut names: Vec<libc::sockaddr_storage> = (0..N)
            .map(|i| {
                // SAFETY: all-zero is a valid sockaddr_storage.
                let mut st: libc::sockaddr_storage = unsafe { zeroed() };
                let to = if refused.contains(&i) {
                    SocketAddr::new(good.ip(), 0)
                } else {
                    good
                };
                std_to_sockaddr(to, &mut st);
                st
            })
            .collect();
        let mut payloads: Vec<[u8; 1]> = (0..N).map(|i| [i as u8]).collect();
        let mut iovs: Vec<libc::iovec> = payloads
            .iter_mut()
            .map(|p| libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: 1,
            })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = (0..N)
            .map(|i| {
                // SAFETY: all-zero is a valid mmsghdr (null pointers, zero lengths).
                let mut h: libc::mmsghdr = unsafe { zeroed() };
                h.msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
                h.msg_hdr.msg_iov = &mut iovs[i];
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        let mut failures = Failures::default();
        let sent = send_batch(sender.as_raw_fd(), &mut hdrs, &mut failures);
        assert_eq!(sent, N - refused.len());
        assert_eq!(failures.0, vec![(SendError::Invalid, 1); refused.len()]);
        let mut seen = Vec::new();
        let mut buf = [0u8; 8];
        while let Ok(n) = receiver.recv(&mut buf) {
            assert_eq!(n, 1);
            seen.push(buf[0] as usize);
            if seen.len() == N - refused.len() {
                break;
            }
        }
        let want: Vec<usize> = (0..N).filter(|i| !refused.contains(i)).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn send_errors_by_reason() {
        assert_eq!(SendError::from_errno(libc::EINVAL), SendError::Invalid);
        assert_eq!(SendError::from_errno(libc::EPERM), SendError::NotPermitted);
        assert_eq!(SendError::from_errno(libc::ENETUNREACH), SendError::Unreachable);
        assert_eq!(SendError::from_errno(libc::ENOBUFS), SendError::BufferFull);
        assert_eq!(SendError::from_errno(libc::EIO), SendError::Other);
    }
}

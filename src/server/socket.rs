//! UDP socket setup for the workers and the raw pieces both backends share:
//! socket options, sockaddr conversion, and control-message (cmsg) parsing and building.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::Duration;

/// Receive buffer per datagram: one byte more than the largest request we answer, so a longer
/// datagram is seen as too long instead of silently cut to an acceptable size.
pub const BUF_LEN: usize = crate::proto::MAX_REQUEST_LEN + 1;

/// Room for the cmsgs a received datagram carries (SO_TIMESTAMPNS + IP(V6)_PKTINFO), and for the
/// one pktinfo we attach to a reply. In u64 words, so the buffer has cmsghdr alignment.
pub const CTRL_WORDS: usize = 16;

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
    pub local: Option<LocalAddr>,
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
                (libc::IPPROTO_IP, libc::IP_PKTINFO) => {
                    let pi = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                    info.local = Some(LocalAddr::V4 {
                        addr: Ipv4Addr::from(u32::from_be(pi.ipi_addr.s_addr)),
                    });
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let pi = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    info.local = Some(LocalAddr::V6 {
                        addr: Ipv6Addr::from(pi.ipi6_addr.s6_addr),
                        ifindex: pi.ipi6_ifindex,
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

/// The IP address part of a peer, with IPv4-mapped IPv6 shown as IPv4.
pub fn peer_ip(addr: &SocketAddr) -> IpAddr {
    match addr {
        SocketAddr::V4(a) => IpAddr::V4(*a.ip()),
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(*a.ip()),
        },
    }
}

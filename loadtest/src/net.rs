//! The generator's sockets and batched syscalls: `sendmmsg` with a per-packet source address
//! (IP_PKTINFO), `recvmmsg` with the sender's address. The crate's only `unsafe` lives here.

use gnomon::proto::HEADER_LEN;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};

/// Room for one IP_PKTINFO control message, aligned as the kernel wants cmsghdr.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct CmsgBuf([u8; 32]);

/// Bytes of control data one IP_PKTINFO message takes (CMSG_SPACE of `in_pktinfo`).
fn pktinfo_space() -> usize {
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize }
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// One UDP socket of the generator: bound to the wildcard address on an ephemeral port, so
/// replies to any 127/8 source we claim with IP_PKTINFO come back to it.
pub struct GenSocket {
    socket: Socket,
}

impl GenSocket {
    pub fn new(buffer_bytes: usize) -> io::Result<GenSocket> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        // Large buffers on our side, so that what we measure is the server's loss, not ours.
        socket.set_recv_buffer_size(buffer_bytes)?;
        socket.set_send_buffer_size(buffer_bytes)?;
        socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0).into())?;
        Ok(GenSocket { socket })
    }

    pub fn fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }

    pub fn local_port(&self) -> io::Result<u16> {
        Ok(self.socket.local_addr()?.as_socket().map_or(0, |a| a.port()))
    }
}

/// A batch of 48-byte requests to one destination, each with its own source address.
/// The header arrays are built once; `send` only refreshes the pointers, so nothing is
/// allocated per batch.
/// The longest request a batch holds: an NTS request with one cookie is 232 bytes.
pub const MAX_SEND_LEN: usize = 512;

pub struct SendBatch {
    dest: libc::sockaddr_in,
    bufs: Vec<[u8; MAX_SEND_LEN]>,
    lens: Vec<usize>,
    sources: Vec<Ipv4Addr>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<CmsgBuf>,
    hdrs: Vec<libc::mmsghdr>,
    len: usize,
    /// Whether each packet carries an IP_PKTINFO source (off: the kernel picks the source).
    set_source: bool,
}

impl SendBatch {
    pub fn new(capacity: usize, dest: SocketAddrV4, set_source: bool) -> SendBatch {
        SendBatch {
            dest: sockaddr_in(dest),
            bufs: vec![[0; MAX_SEND_LEN]; capacity],
            lens: vec![HEADER_LEN; capacity],
            sources: vec![Ipv4Addr::LOCALHOST; capacity],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                capacity
            ],
            cmsgs: vec![CmsgBuf([0; 32]); capacity],
            // SAFETY: mmsghdr is plain C data; all-zero is a valid (empty) value.
            hdrs: (0..capacity).map(|_| unsafe { zeroed::<libc::mmsghdr>() }).collect(),
            len: 0,
            set_source,
        }
    }

    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends a packet; returns its buffer to fill. The caller keeps `len() < capacity()`.
    pub fn push(&mut self, source: Ipv4Addr) -> &mut [u8; HEADER_LEN] {
        let i = self.len;
        self.len += 1;
        self.sources[i] = source;
        self.lens[i] = HEADER_LEN;
        (&mut self.bufs[i][..HEADER_LEN]).try_into().expect("header-sized")
    }

    /// Appends a packet of up to [`MAX_SEND_LEN`] bytes (an NTS request), longer ones cut.
    pub fn push_bytes(&mut self, source: Ipv4Addr, bytes: &[u8]) {
        let i = self.len;
        self.len += 1;
        self.sources[i] = source;
        let n = bytes.len().min(MAX_SEND_LEN);
        self.bufs[i][..n].copy_from_slice(&bytes[..n]);
        self.lens[i] = n;
    }

    /// Packet `i`'s bytes, as pushed.
    pub fn payload(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i]]
    }

    /// Sends the whole batch with as few `sendmmsg` calls as the kernel allows. Returns how
    /// many packets the kernel accepted; the rest were refused (counted by the caller).
    pub fn send(&mut self, fd: RawFd) -> io::Result<usize> {
        let space = pktinfo_space();
        for i in 0..self.len {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.lens[i],
            };
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.dest as *mut libc::sockaddr_in).cast();
            h.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_flags = 0;
            if self.set_source {
                h.msg_control = self.cmsgs[i].0.as_mut_ptr().cast();
                h.msg_controllen = space as _;
                // SAFETY: msg_control points at our 32-byte aligned buffer, which is at least
                // CMSG_SPACE(in_pktinfo) long, so the first header and its data fit in it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(h);
                    (*c).cmsg_level = libc::IPPROTO_IP;
                    (*c).cmsg_type = libc::IP_PKTINFO;
                    (*c).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
                    let info = libc::in_pktinfo {
                        ipi_ifindex: 0,
                        ipi_spec_dst: libc::in_addr {
                            s_addr: u32::from(self.sources[i]).to_be(),
                        },
                        ipi_addr: libc::in_addr { s_addr: 0 },
                    };
                    std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>(), info);
                }
            } else {
                h.msg_control = std::ptr::null_mut();
                h.msg_controllen = 0;
            }
        }
        let mut done = 0;
        while done < self.len {
            // SAFETY: hdrs[done..len] were filled above and point at buffers owned by self,
            // which outlive the call.
            let n = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[done..].as_mut_ptr(),
                    (self.len - done) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if done > 0 {
                    return Ok(done);
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            done += n as usize;
        }
        Ok(done)
    }
}

/// Receive buffers for one `recvmmsg` call. Replies longer than a header are kept up to
/// `RECV_BUF_LEN` bytes, which is enough to see that they are too long.
pub struct RecvBatch {
    bufs: Vec<[u8; RECV_BUF_LEN]>,
    names: Vec<libc::sockaddr_in>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

pub const RECV_BUF_LEN: usize = 256;

impl RecvBatch {
    pub fn new(capacity: usize) -> RecvBatch {
        RecvBatch {
            bufs: vec![[0; RECV_BUF_LEN]; capacity],
            // SAFETY: sockaddr_in is plain C data; all-zero is valid.
            names: vec![unsafe { zeroed() }; capacity],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                capacity
            ],
            // SAFETY: as above.
            hdrs: (0..capacity).map(|_| unsafe { zeroed::<libc::mmsghdr>() }).collect(),
        }
    }

    /// Reads what is queued without blocking. Returns the number of datagrams (0 if none).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for i in 0..self.bufs.len() {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: RECV_BUF_LEN,
            };
            let h = &mut self.hdrs[i];
            h.msg_len = 0;
            h.msg_hdr.msg_name = (&mut self.names[i] as *mut libc::sockaddr_in).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
        }
        // SAFETY: every header points at buffers owned by self that outlive the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        Ok(n as usize)
    }

    /// The i-th datagram of the last `recv` and who sent it.
    pub fn get(&self, i: usize) -> (&[u8], SocketAddrV4) {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(RECV_BUF_LEN);
        let a = &self.names[i];
        let from = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        );
        (&self.bufs[i][..len], from)
    }

    /// Whether the i-th datagram was longer than the buffer (then it is reported too long).
    pub fn truncated(&self, i: usize) -> bool {
        self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0
    }
}

/// Waits for replies on several sockets at once; built once, reused for every wait.
pub struct Poller {
    pfds: Vec<libc::pollfd>,
}

impl Poller {
    pub fn new(fds: &[RawFd]) -> Poller {
        Poller {
            pfds: fds
                .iter()
                .map(|&fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect(),
        }
    }

    /// Waits until a socket is readable or `timeout_ms` passes.
    pub fn wait(&mut self, timeout_ms: i32) -> io::Result<()> {
        // SAFETY: pfds is a live array of pfds.len() pollfd structs.
        let n = unsafe { libc::poll(self.pfds.as_mut_ptr(), self.pfds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            for p in &mut self.pfds {
                p.revents = 0;
            }
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Whether the i-th socket was readable at the last wait.
    pub fn readable(&self, i: usize) -> bool {
        self.pfds[i].revents & libc::POLLIN != 0
    }
}

/// Lets `thread::sleep` wake within a microsecond or so instead of the default 50 us slack,
/// so a paced sender keeps its schedule at low rates without spinning.
pub fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
}

/// Moves thread `tid` (another process's, such as a kernel NAPI thread) to `cpu` alone.
pub fn pin_thread(tid: i32, cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain bits; all-zero is the empty set, filled by CPU_SET.
    let mut set: libc::cpu_set_t = unsafe { zeroed() };
    // SAFETY: CPU_SET writes one bit inside `set` (cpu is checked against its size first).
    unsafe {
        if cpu >= 8 * size_of::<libc::cpu_set_t>() {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        libc::CPU_SET(cpu, &mut set);
    }
    // SAFETY: `set` is a live cpu_set_t of the size passed.
    if unsafe { libc::sched_setaffinity(tid, size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The MAC address of interface `name` in the calling thread's network namespace (sysfs shows
/// the namespace it was mounted in, which need not be the thread's).
pub fn interface_mac(name: &str) -> io::Result<[u8; 6]> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    // SAFETY: ifreq is plain C data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.as_bytes().iter().take(libc::IFNAMSIZ - 1))
    {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills the live `req` it is given.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: after SIOCGIFHWADDR the union holds the hardware address.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data) {
        *m = d as u8;
    }
    Ok(mac)
}

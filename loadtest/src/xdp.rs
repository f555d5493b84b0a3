//! `--xdp IFACE`: requests sent and replies taken through an AF_XDP socket on the generator's
//! own interface (a veth end in its namespace), past the kernel's UDP stack on this side, so
//! that on a two-core machine the generator costs less per request than the server it drives.
//! gnomon's own XDP program redirects the replies (UDP to our address and port) to the socket;
//! everything else (ARP, the NTS-KE TCP connections) still goes to the kernel.

use gnomon::xdp::frame::{Target, build_datagram};
use gnomon::xdp::sys::{Link, Mode, Program};
use gnomon::xdp::xsk::{BATCH, TTL, Xsk};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::RawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// UMEM chunks (and ring size): a quarter for requests in flight to the kernel, the rest for
/// replies, which wait in the RX ring while the receiver thread shares its core with the
/// sender and the interface's NAPI thread (12K replies: 61 ms at 200k/s; 32 MB of UMEM).
const FRAMES: u32 = 16384;

/// The socket, the attached program and the addresses every frame carries.
pub struct XdpPath {
    /// Shared by the sender (TX and completion rings) and the receiver (RX and fill rings):
    /// locked once per batch, never per packet.
    xsk: Mutex<Xsk>,
    fd: RawFd,
    /// Detaches the program when dropped.
    _link: Link,
    _program: Program,
    /// Holds our port in the kernel, so no other socket takes it while we use it.
    _port: UdpSocket,
    source: SocketAddrV4,
    target: SocketAddrV4,
    /// Ours, then the next hop's (the target's, on a veth pair).
    macs: ([u8; 6], [u8; 6]),
}

fn mac(text: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = text
        .trim()
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    v.try_into().ok()
}

/// The MAC the kernel has resolved for `ip` on `dev`, from the ARP table of the calling
/// thread's network namespace.
fn neighbour(ip: Ipv4Addr, dev: &str) -> Option<[u8; 6]> {
    let table = std::fs::read_to_string("/proc/thread-self/net/arp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // IP address, HW type, Flags (0x2: complete), HW address, Mask, Device.
        (f.len() >= 6 && f[0] == ip.to_string() && f[2] == "0x2" && f[5] == dev)
            .then(|| mac(f[3]))
            .flatten()
    })
}

/// Pins `dev`'s threaded-NAPI kernel threads (`napi/DEV-ID`) to `cpu`: attaching an XDP
/// program makes a veth end's NAPI anew, with threads free to run anywhere, and the replies'
/// receive work (redirect and copy into our UMEM) is the generator's to pay, not the server's
/// core's. Returns how many were pinned (none where NAPI is not threaded).
fn pin_napi_threads(dev: &str, cpu: usize) -> usize {
    // The thread name is cut at 15 characters.
    let prefix: String = format!("napi/{dev}-").chars().take(15).collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut n = 0;
    for p in procs.flatten() {
        let Ok(tid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
        if comm.trim_end().starts_with(&prefix) && crate::net::pin_thread(tid, cpu).is_ok() {
            n += 1;
        }
    }
    n
}

impl XdpPath {
    /// Opens the path on `dev` toward `target`, which must be on that link (a veth peer); with
    /// `cpu`, the interface's NAPI threads are pinned there (see `pin_napi_threads`).
    pub fn open(dev: &str, target: SocketAddrV4, cpu: Option<usize>) -> Result<XdpPath, String> {
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("--xdp {dev}: {what}: {e}");
        let ifindex = gnomon::server::xdp::ifindex(dev).ok_or(format!("--xdp {dev}: no such interface"))?;
        let own = crate::net::interface_mac(dev).map_err(|e| fail("its MAC address", &e))?;
        // Our address toward the target, and a port of our own on it. The probe goes to the
        // discard port, so that what makes the kernel resolve the next hop is no request of ours.
        let probe = UdpSocket::bind("0.0.0.0:0").map_err(|e| fail("socket", &e))?;
        probe
            .connect(SocketAddrV4::new(*target.ip(), 9))
            .map_err(|e| fail("no route to the target", &e))?;
        let ip = match probe.local_addr().map_err(|e| fail("local address", &e))?.ip() {
            std::net::IpAddr::V4(ip) => ip,
            std::net::IpAddr::V6(_) => return Err(format!("--xdp {dev}: IPv4 only")),
        };
        let port = UdpSocket::bind(SocketAddrV4::new(ip, 0)).map_err(|e| fail("port", &e))?;
        let source = match port.local_addr().map_err(|e| fail("port", &e))? {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => unreachable!("bound to an IPv4 address"),
        };
        // The next hop's MAC: a datagram through the kernel makes it resolve it.
        let deadline = Instant::now() + Duration::from_secs(2);
        let next = loop {
            let _ = probe.send(&[0u8; 48]);
            if let Some(m) = neighbour(*target.ip(), dev) {
                break m;
            }
            if Instant::now() > deadline {
                return Err(format!("--xdp {dev}: {} not resolved (not on this link?)", target.ip()));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let to_us = Target {
            v4: Some(ip),
            v6: None,
            port: source.port(),
        };
        let program = Program::load(&to_us, 1).map_err(|e| fail("loading the XDP program", &e))?;
        let link = program
            .attach(ifindex, Mode::Native)
            .map_err(|e| fail("attaching the XDP program", &e))?;
        let xsk = Xsk::bind_sending(ifindex, 0, to_us, FRAMES, FRAMES / 4).map_err(|e| fail("AF_XDP socket", &e))?;
        program.bind_queue(0, xsk.raw_fd()).map_err(|e| fail("XSKMAP", &e))?;
        if let Some(cpu) = cpu
            && pin_napi_threads(dev, cpu) == 0
        {
            eprintln!(
                "gnomon-load: --xdp {dev}: no threaded NAPI thread to pin to CPU {cpu}; the replies' \
                 receive work runs wherever the kernel puts it"
            );
        }
        Ok(XdpPath {
            fd: xsk.raw_fd(),
            xsk: Mutex::new(xsk),
            _link: link,
            _program: program,
            _port: port,
            source,
            target,
            macs: (own, next),
        })
    }

    /// The socket's fd, to poll for replies.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// Sends `n` payloads, `payload(i)` each; returns how many left (the rest were refused).
    pub fn send<'p>(&self, n: usize, payload: impl Fn(usize) -> &'p [u8]) -> io::Result<usize> {
        let mut xsk = self.xsk.lock().expect("poisoned");
        let mut sent = 0;
        // More than one TX ring batch at a time is taken in rounds.
        while sent < n {
            let k = xsk.send_frames(n - sent, |i, frame| {
                build_datagram(frame, self.macs, self.source, self.target, payload(sent + i), TTL)
            })?;
            if k == 0 {
                break;
            }
            sent += k;
        }
        Ok(sent)
    }

    /// Takes the replies waiting, copied into `scratch` under the socket's lock, then
    /// `f(payload, from)` for each with the lock released, so that checking them (NTS
    /// authenticators) never holds up the sender. Returns how many frames left the RX ring
    /// (those that were no UDP for us included): [`BATCH`] says more may wait.
    pub fn recv(&self, scratch: &mut RecvScratch, mut f: impl FnMut(&[u8], SocketAddrV4)) -> usize {
        let mut n = 0;
        let taken = {
            let mut xsk = self.xsk.lock().expect("poisoned");
            xsk.recv_frames(|r, frame| {
                if let std::net::SocketAddr::V4(from) = r.peer {
                    let len = r.payload_len.min(RECV_LEN);
                    scratch.bufs[n][..len].copy_from_slice(&frame[r.payload..r.payload + len]);
                    scratch.meta[n] = (len, from);
                    n += 1;
                }
            })
        };
        for (buf, &(len, from)) in scratch.bufs.iter().zip(&scratch.meta[..n]) {
            f(&buf[..len], from);
        }
        taken
    }
}

/// The longest reply kept: longer ones are cut (and fail their checks), as a request is never
/// longer than [`crate::net::MAX_SEND_LEN`] and a reply never longer than its request.
const RECV_LEN: usize = 2 * crate::net::MAX_SEND_LEN;

/// Where [`XdpPath::recv`] copies one RX batch, made once per receiver.
pub struct RecvScratch {
    bufs: Vec<[u8; RECV_LEN]>,
    meta: Vec<(usize, SocketAddrV4)>,
}

impl Default for RecvScratch {
    fn default() -> Self {
        RecvScratch {
            bufs: vec![[0; RECV_LEN]; BATCH],
            meta: vec![(0, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); BATCH],
        }
    }
}

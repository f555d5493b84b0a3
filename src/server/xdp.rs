//! `io = "xdp"`: the XDP program on the configured interface and one AF_XDP socket per RX queue,
//! each served by a worker of its own through the same [`Handler`] as the kernel sockets, which
//! stay bound beside them (what the program passes on, or everything once it is gone, is still
//! answered there).
//!
//! Set-up happens in [`bind`](super::bind), while the process still has its privileges; when any
//! step fails the reason is one log line and the server goes on with its kernel sockets only,
//! unless `[xdp] required = true` makes it a start-up error.

use super::Handler;
use crate::xdp::frame::{COUNT_NO_SOCKET, COUNT_REDIRECTED, COUNTERS, Pass, Target};
use crate::xdp::sys::{Link, Mode, Program};
use crate::xdp::xsk::{Xsk, XskStats};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `[xdp]` of the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdpOptions {
    pub interface: String,
    /// RX queues to serve; empty = every queue the interface has.
    pub queues: Vec<u32>,
    /// Refuse to start instead of falling back to the kernel sockets alone.
    pub required: bool,
}

/// Why the AF_XDP path is not used: said in one line, then the kernel sockets serve alone.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the program and the sockets counted, for `gnomon stats` and the metrics; read off the
/// hot path (the program's map by the reader, the sockets' counters by their workers about once
/// a second).
pub struct XdpCounters {
    pub interface: String,
    /// "zero-copy" or "copy".
    pub mode: &'static str,
    program: Program,
    sockets: Vec<SocketCounters>,
}

/// One socket's counters, as its worker last published them.
struct SocketCounters {
    queue: u32,
    kernel: Mutex<XskStats>,
    /// Redirected frames with a wrong IPv4 header or UDP checksum, dropped as the kernel would.
    malformed: AtomicU64,
}

/// The names of the program's counters, indexed as its map (`COUNT_*` and [`Pass`]).
pub fn counter_name(i: usize) -> &'static str {
    const PASS: [Pass; 11] = [
        Pass::Short,
        Pass::GroupMac,
        Pass::Ethertype,
        Pass::IpHeader,
        Pass::Fragment,
        Pass::NotUdp,
        Pass::Address,
        Pass::Port,
        Pass::Length,
        Pass::IpChecksum,
        Pass::UdpChecksum,
    ];
    if i == COUNT_REDIRECTED as usize {
        return "redirected";
    }
    if i == COUNT_NO_SOCKET as usize {
        return "passed_no_socket";
    }
    match PASS.iter().find(|p| **p as usize == i) {
        Some(Pass::Short) => "passed_short",
        Some(Pass::GroupMac) => "passed_group_mac",
        Some(Pass::Ethertype) => "passed_ethertype",
        Some(Pass::IpHeader) => "passed_ip_header",
        Some(Pass::Fragment) => "passed_fragment",
        Some(Pass::NotUdp) => "passed_not_udp",
        Some(Pass::Address) => "passed_address",
        Some(Pass::Port) => "passed_port",
        Some(Pass::Length) => "passed_length",
        Some(Pass::IpChecksum) => "dropped_ip_checksum",
        Some(Pass::UdpChecksum) => "dropped_udp_checksum",
        None => "other",
    }
}

impl XdpCounters {
    /// The program's counters by name (summed over CPUs), then each socket's kernel counters.
    pub fn program(&self) -> Vec<(&'static str, u64)> {
        let c = self.program.counters().unwrap_or([0; COUNTERS as usize]);
        c.iter().enumerate().map(|(i, v)| (counter_name(i), *v)).collect()
    }

    /// Everything counted so far (one map lookup per counter: for readers, not workers).
    pub fn view(&self) -> XdpView {
        XdpView {
            interface: self.interface.clone(),
            mode: self.mode,
            // The checksum reasons are the workers' (per socket, `bad_checksum`): the program
            // never counts them.
            program: self
                .program()
                .into_iter()
                .filter(|(k, _)| *k != "other" && !k.starts_with("dropped_"))
                .collect(),
            sockets: self
                .sockets()
                .into_iter()
                .map(|(queue, k, bad_checksum)| SocketView {
                    queue,
                    rx_ring_full: k.rx_ring_full,
                    fill_ring_empty: k.rx_fill_ring_empty_descs,
                    rx_dropped: k.rx_dropped,
                    rx_invalid_descs: k.rx_invalid_descs,
                    tx_invalid_descs: k.tx_invalid_descs,
                    bad_checksum,
                })
                .collect(),
        }
    }

    /// The RX queues served, one socket and worker each.
    pub fn queues(&self) -> Vec<u32> {
        self.sockets.iter().map(|s| s.queue).collect()
    }

    /// Per queue: the socket's XDP_STATISTICS as its worker last read them, and the frames it
    /// dropped for bad checksums.
    pub fn sockets(&self) -> Vec<(u32, XskStats, u64)> {
        self.sockets
            .iter()
            .map(|s| {
                let k = s.kernel.lock().map(|k| *k).unwrap_or_default();
                (s.queue, k, s.malformed.load(Ordering::Relaxed))
            })
            .collect()
    }
}

/// One socket's counters as `gnomon stats --json` shows them.
#[derive(serde::Serialize, Clone, Debug, PartialEq, Eq)]
pub struct SocketView {
    pub queue: u32,
    /// Frames the kernel dropped because the RX ring was full (the worker fell behind).
    pub rx_ring_full: u64,
    /// Times the kernel found the fill ring empty (no chunk to receive into).
    pub fill_ring_empty: u64,
    /// Other drops by the kernel (e.g. a frame longer than a chunk).
    pub rx_dropped: u64,
    pub rx_invalid_descs: u64,
    pub tx_invalid_descs: u64,
    /// Redirected frames with a wrong IPv4 header or UDP checksum, dropped by the worker.
    pub bad_checksum: u64,
}

/// The AF_XDP section of `gnomon stats`.
#[derive(serde::Serialize, Clone, Debug, PartialEq, Eq)]
pub struct XdpView {
    pub interface: String,
    pub mode: &'static str,
    /// The program's verdicts: `redirected`, `passed_<reason>` (left to the kernel).
    pub program: std::collections::BTreeMap<&'static str, u64>,
    pub sockets: Vec<SocketView>,
}

impl XdpView {
    /// The text lines of `gnomon stats`.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = format!("\nAF_XDP on {} ({} mode)\n", self.interface, self.mode);
        for (k, v) in self.program.iter().filter(|(k, v)| **v > 0 || **k == "redirected") {
            let _ = writeln!(out, "{k:<22} {v:>9}");
        }
        for s in &self.sockets {
            let _ = writeln!(
                out,
                "queue {:<3} rx_ring_full {} fill_ring_empty {} rx_dropped {} bad_checksum {}",
                s.queue, s.rx_ring_full, s.fill_ring_empty, s.rx_dropped, s.bad_checksum
            );
        }
        out
    }

    /// Prometheus text lines (appended to the exporter's).
    pub fn prometheus(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP gnomon_xdp_program_packets_total Frames the XDP program saw, by verdict (redirected to AF_XDP, or passed to the kernel and why).\n# TYPE gnomon_xdp_program_packets_total counter"
        );
        for (k, v) in &self.program {
            let _ = writeln!(
                out,
                "gnomon_xdp_program_packets_total{{interface=\"{}\",verdict=\"{k}\"}} {v}",
                self.interface
            );
        }
        type Field = fn(&SocketView) -> u64;
        let per_socket: [(&str, &str, Field); 4] = [
            (
                "gnomon_xdp_rx_ring_full_total",
                "Frames dropped on a full AF_XDP RX ring.",
                |s| s.rx_ring_full,
            ),
            (
                "gnomon_xdp_fill_ring_empty_total",
                "Times the kernel found the AF_XDP fill ring empty.",
                |s| s.fill_ring_empty,
            ),
            (
                "gnomon_xdp_rx_dropped_total",
                "Other frames the kernel dropped before the AF_XDP socket.",
                |s| s.rx_dropped,
            ),
            (
                "gnomon_xdp_bad_checksum_total",
                "Redirected frames with a wrong checksum, dropped.",
                |s| s.bad_checksum,
            ),
        ];
        for (name, help, get) in per_socket {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for s in &self.sockets {
                let _ = writeln!(
                    out,
                    "{name}{{interface=\"{}\",queue=\"{}\"}} {}",
                    self.interface,
                    s.queue,
                    get(s)
                );
            }
        }
        out
    }
}

/// The attached program and its sockets, bound and not yet served.
pub struct XdpBound {
    /// Detaches the program when dropped (and the kernel does when the process ends).
    pub link: Link,
    pub counters: Arc<XdpCounters>,
    pub sockets: Vec<(u32, Xsk)>,
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The interface's addresses (IPv4, then IPv6 without link-local ones), from getifaddrs.
fn interface_addrs(name: &str) -> io::Result<(Vec<Ipv4Addr>, Vec<Ipv6Addr>)> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    let mut p = head;
    while !p.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        // SAFETY: ifa_name is a NUL-terminated string of the node.
        let n = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if ifa.ifa_addr.is_null() || n.to_bytes() != name.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr points at a sockaddr whose family says its real type.
        match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                v4.push(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)));
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 sockaddr is a sockaddr_in6.
                let a = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
                if !ip.is_unicast_link_local() {
                    v6.push(ip);
                }
            }
            _ => {}
        }
    }
    // SAFETY: frees the list getifaddrs returned; nothing points into it any more.
    unsafe { libc::freeifaddrs(head) };
    Ok((v4, v6))
}

/// What the program takes: the listen addresses on this interface (a wildcard stands for the
/// interface's first address of its family) and their port.
fn target(interface: &str, listen: &[SocketAddr]) -> Result<Target, Unavailable> {
    let port = listen[0].port();
    let (v4s, v6s) = interface_addrs(interface).map_err(|e| Unavailable(format!("reading its addresses: {e}")))?;
    let mut t = Target {
        v4: None,
        v6: None,
        port,
    };
    for a in listen.iter().filter(|a| a.port() == port) {
        match a.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => t.v4 = t.v4.or(v4s.first().copied()),
            IpAddr::V4(ip) if v4s.contains(&ip) => t.v4 = t.v4.or(Some(ip)),
            IpAddr::V6(ip) if ip.is_unspecified() => t.v6 = t.v6.or(v6s.first().copied()),
            IpAddr::V6(ip) if v6s.contains(&ip) => t.v6 = t.v6.or(Some(ip)),
            _ => {}
        }
    }
    if t.v4.is_none() && t.v6.is_none() {
        return Err(Unavailable(format!(
            "none of the listen addresses on port {port} is on the interface"
        )));
    }
    Ok(t)
}

/// Every RX queue of the interface, from /sys/class/net (1 where it does not say).
fn all_queues(interface: &str) -> Vec<u32> {
    let n = std::fs::read_dir(format!("/sys/class/net/{interface}/queues"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count()
        })
        .unwrap_or(0);
    (0..n.max(1) as u32).collect()
}

fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

/// Loads and attaches the program and binds one socket per queue; every failure says which
/// step and why, in words an operator can act on.
pub fn setup(o: &XdpOptions, listen: &[SocketAddr]) -> Result<XdpBound, Unavailable> {
    let dev = &o.interface;
    let fail = |what: String| Unavailable(format!("AF_XDP on {dev}: {what}"));
    let Some(index) = ifindex(dev) else {
        return Err(fail("no such interface".into()));
    };
    let t = target(dev, listen).map_err(|u| fail(u.0))?;
    let queues = if o.queues.is_empty() {
        all_queues(dev)
    } else {
        o.queues.clone()
    };
    let entries = queues.iter().max().map_or(1, |m| m + 1);
    let program = Program::load(&t, entries).map_err(|e| match errno(&e.error) {
        Some(libc::EPERM) | Some(libc::EACCES) => fail(format!(
            "not permitted to load an XDP program ({}; needs CAP_BPF and CAP_NET_ADMIN, or root)",
            e.error
        )),
        Some(libc::ENOSYS) => fail("this kernel has no bpf()".into()),
        _ => fail(e.to_string()),
    })?;
    let link = program.attach(index, Mode::Native).map_err(|e| match errno(&e) {
        Some(libc::EBUSY) | Some(libc::EEXIST) => fail(format!(
            "the interface already has an XDP program that is not gnomon's ({e}); gnomon's own \
             detaches when its process ends, so this one was attached by another tool \
             (`ip link set dev {dev} xdp off` removes one attached by ip)"
        )),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => fail(format!("the driver has no native XDP ({e})")),
        Some(libc::EPERM) => fail(format!("not permitted to attach ({e}; needs CAP_NET_ADMIN)")),
        _ => fail(format!("attaching the program: {e}")),
    })?;
    let mut sockets = Vec::new();
    for &q in &queues {
        let x = Xsk::bind(index, q, t).map_err(|e| match errno(&e) {
            Some(libc::EAFNOSUPPORT) => fail("this kernel has no AF_XDP sockets".into()),
            Some(libc::EPERM) => fail(format!(
                "not permitted to open an AF_XDP socket ({e}; needs CAP_NET_RAW)"
            )),
            _ => fail(format!("binding an AF_XDP socket to queue {q}: {e}")),
        })?;
        program
            .bind_queue(q, x.raw_fd())
            .map_err(|e| fail(format!("queue {q} into the XSKMAP: {e}")))?;
        sockets.push((q, x));
    }
    let mode = if sockets.iter().all(|(_, x)| x.zero_copy()) {
        "zero-copy"
    } else {
        "copy"
    };
    let counters = Arc::new(XdpCounters {
        interface: dev.clone(),
        mode,
        program,
        sockets: queues
            .iter()
            .map(|&queue| SocketCounters {
                queue,
                kernel: Mutex::new(XskStats::default()),
                malformed: AtomicU64::new(0),
            })
            .collect(),
    });
    Ok(XdpBound {
        link,
        counters,
        sockets,
    })
}

/// How often a worker copies its socket's kernel counters out (one getsockopt).
const STATS_EVERY: Duration = Duration::from_secs(1);

/// One AF_XDP worker: batches until `stop`.
pub fn run<H: Handler>(
    xsk: &mut Xsk,
    slot: usize,
    counters: &XdpCounters,
    handler: &mut H,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut next_stats = Instant::now();
    let mut malformed = 0u64;
    let shared = &counters.sockets[slot];
    while !stop.load(Ordering::Relaxed) {
        malformed += xsk.serve_batch(handler, 100)?.malformed as u64;
        if Instant::now() >= next_stats {
            next_stats = Instant::now() + STATS_EVERY;
            shared.malformed.store(malformed, Ordering::Relaxed);
            if let (Ok(st), Ok(mut s)) = (xsk.stats(), shared.kernel.lock()) {
                *s = st;
            }
        }
    }
    Ok(())
}

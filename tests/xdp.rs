//! The XDP program in the kernel: the verifier accepts it, it decides every frame as
//! `xdp::frame::classify` does (BPF_PROG_TEST_RUN), and attached to a veth end in a network
//! namespace it counts requests and passes everything to the kernel when no AF_XDP socket is bound.
//! Needs root (CAP_BPF, CAP_NET_ADMIN); skips with a SKIPPED line otherwise.

mod common;

use common::{is_root, run_bounded, skip};
use gnomon::xdp::frame::{COUNT_NO_SOCKET, Pass, Target, classify};
use gnomon::xdp::program::{XDP_PASS, XDP_REDIRECT};
use gnomon::xdp::sys::{LoadError, Mode, Program, Redirect};
use proptest::prelude::*;
use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

#[global_allocator]
static GLOBAL: common::alloc::Counting = common::alloc::Counting;

const SERVER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// More client addresses, for access rules: ignored, denied, limited.
const CLIENTS4: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 0, 3),
    Ipv4Addr::new(198, 18, 0, 4),
    Ipv4Addr::new(198, 18, 0, 5),
];
// 2001:2::/48 is IPv6's benchmarking range (RFC 5180), as 198.18.0.0/15 is IPv4's (RFC 2544).
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 2);

fn target(port: u16) -> Target {
    Target {
        v4: Some(SERVER4),
        v6: Some(SERVER6),
        port,
    }
}

/// The program for `t`, or None (with a SKIPPED line) where this process may not load BPF.
fn load(t: &Target) -> Option<Program> {
    loaded(|| Program::load(t, 4))
}

/// A program from `load`, or `None` with a SKIPPED line where this process may not load one.
fn loaded<P>(load: impl FnOnce() -> Result<P, LoadError>) -> Option<P> {
    if !is_root() {
        skip("loading an XDP program needs root (CAP_BPF)");
        return None;
    }
    match load() {
        Ok(p) => Some(p),
        Err(e) if e.error.raw_os_error() == Some(libc::EPERM) => {
            skip(&format!("bpf() refused here: {e}"));
            None
        }
        Err(e) => panic!("{e}\n{}", e.log),
    }
}

/// Headers for a frame classify takes (checksums left zero: neither side looks at them).
fn request_frame(ipv6: bool, vlan: bool, port: u16) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    if vlan {
        f.extend_from_slice(&[0x81, 0, 0, 5]);
    }
    let udp_len: u16 = 8 + 48;
    if ipv6 {
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[17, 64]);
        f.extend_from_slice(&CLIENT6.octets());
        f.extend_from_slice(&SERVER6.octets());
    } else {
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&(20 + udp_len).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&CLIENT4.octets());
        f.extend_from_slice(&SERVER4.octets());
    }
    f.extend_from_slice(&40000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&[0x23; 48]);
    f
}

/// The counter a verdict of classify lands in when no socket is bound.
fn slot(v: Result<gnomon::xdp::frame::Request, Pass>) -> usize {
    match v {
        Ok(_) => COUNT_NO_SOCKET as usize,
        Err(p) => p as usize,
    }
}

/// Runs `f` through the program and returns the counter it incremented and the verdict.
fn kernel_verdict(p: &Program, f: &[u8]) -> (usize, u32) {
    let before = p.counters().unwrap();
    let verdict = p.test_run(f).unwrap();
    let after = p.counters().unwrap();
    let moved: Vec<usize> = (0..before.len()).filter(|&i| after[i] != before[i]).collect();
    assert_eq!(moved.len(), 1, "counters moved: {moved:?} for {f:02x?}");
    (moved[0], verdict)
}

#[test]
fn verifier_accepts_the_program_and_it_decides_as_classify() {
    let t = target(123);
    let Some(p) = load(&t) else { return };
    for ipv6 in [false, true] {
        for vlan in [false, true] {
            let f = request_frame(ipv6, vlan, 123);
            assert!(classify(&f, &t).is_ok());
            assert_eq!(kernel_verdict(&p, &f), (COUNT_NO_SOCKET as usize, XDP_PASS));
        }
    }
    // A family without an address is never taken.
    let only_v4 = Target { v6: None, ..t };
    let p4 = load(&only_v4).unwrap();
    let f = request_frame(true, false, 123);
    assert_eq!(kernel_verdict(&p4, &f).0, Pass::Address as usize);
    // Other ports, including one whose bytes differ only in order.
    let other = target(123u16.swap_bytes());
    let po = load(&other).unwrap();
    assert_eq!(
        kernel_verdict(&po, &request_frame(false, false, 123)).0,
        Pass::Port as usize
    );
}

/// The benches' redirect program (examples/xdp_redirect.rs) passes the verifier and sends
/// every frame on, ARP and other ports too, whatever it holds.
#[test]
fn the_redirect_program_sends_every_frame_on() {
    let Some(p) = loaded(|| Redirect::load(1)) else {
        return;
    };
    let mut arp = request_frame(false, false, 123);
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    for f in [request_frame(false, false, 123), request_frame(true, true, 9), arp] {
        assert_eq!(p.test_run(&f).unwrap(), XDP_REDIRECT);
    }
}

/// Every single-bit change of every header bit of the four request shapes: the kernel and
/// classify agree on each.
#[test]
fn the_program_agrees_with_classify_on_every_header_bit() {
    let t = target(123);
    let Some(p) = load(&t) else { return };
    for ipv6 in [false, true] {
        for vlan in [false, true] {
            let base = request_frame(ipv6, vlan, 123);
            let headers = base.len() - 48;
            for at in 0..headers {
                for bit in 0..8 {
                    let mut f = base.clone();
                    f[at] ^= 1 << bit;
                    let (counted, _) = kernel_verdict(&p, &f);
                    assert_eq!(counted, slot(classify(&f, &t)), "bit {bit} of byte {at}: {f:02x?}");
                }
            }
        }
    }
}

fn mutated() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        any::<bool>(),
        proptest::collection::vec((0usize..70, any::<u8>(), any::<bool>()), 0..4),
        prop_oneof![Just(usize::MAX), 14usize..130],
    )
        .prop_map(|(v6, vlan, edits, cut)| {
            let mut f = request_frame(v6, vlan, 123);
            for (at, b, flip) in edits {
                if at < f.len() {
                    f[at] = if flip { f[at] ^ (1 << (b % 8)) } else { b };
                }
            }
            f.truncate(cut);
            f
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]
    /// The kernel program and classify agree reason for reason on frames near a request and on
    /// arbitrary bytes (test runs need at least an Ethernet header).
    #[test]
    fn the_program_agrees_with_classify(
        f in prop_oneof![mutated(), proptest::collection::vec(any::<u8>(), 14..120)]
    ) {
        let t = target(123);
        thread_local!(static PROG: Option<Program> = load(&target(123)));
        PROG.with(|p| {
            let Some(p) = p else { return Ok(()) };
            let (counted, verdict) = kernel_verdict(p, &f);
            prop_assert_eq!(counted, slot(classify(&f, &t)), "{:02x?}", f);
            prop_assert_eq!(verdict, XDP_PASS);
            Ok(())
        })?;
    }
}

/// Two namespaces joined by a veth pair, deleted when dropped (also on a failed assertion).
struct Netns {
    names: [String; 2],
}

impl Netns {
    fn create() -> Option<Netns> {
        Netns::with_queues(1)
    }

    /// As [`Netns::create`], the veth pair with `queues` RX and TX queues on each end, and
    /// [`CLIENTS4`] on the client's end beside [`CLIENT4`].
    fn with_queues(queues: u32) -> Option<Netns> {
        if !is_root() {
            skip("network namespaces need root");
            return None;
        }
        // Unique per test of this process too: the tests run in parallel.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let ns = Netns {
            names: [format!("gnomon-xdp-s{id}"), format!("gnomon-xdp-c{id}")],
        };
        let [s, c] = &ns.names;
        let extra = CLIENTS4.map(|a| a.to_string()).join(" ");
        let script = format!(
            "set -e
            ip netns add {s}
            ip netns add {c}
            ip -n {s} link add xs numtxqueues {queues} numrxqueues {queues} type veth peer name xc numtxqueues {queues} numrxqueues {queues} netns {c}
            ip -n {s} addr add {SERVER4}/24 dev xs
            ip -n {c} addr add {CLIENT4}/24 dev xc
            for a in {extra}; do ip -n {c} addr add $a/24 dev xc; done
            ip -n {s} addr add {SERVER6}/64 dev xs nodad
            ip -n {c} addr add {CLIENT6}/64 dev xc nodad
            ip -n {s} link set lo up
            ip -n {c} link set lo up
            ip -n {s} link set xs up
            ip -n {c} link set xc up"
        );
        let (ok, out) = run_bounded(Command::new("sh").args(["-c", &script]), Duration::from_secs(20));
        if !ok {
            if std::env::var_os("CI").is_some() {
                panic!("creating the namespaces: {out}");
            }
            skip(&format!("cannot create network namespaces here: {out}"));
            return None;
        }
        Some(ns)
    }

    /// Moves the calling thread (only) into namespace `i`.
    fn enter(&self, i: usize) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.names[i])).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: setns on an open namespace fd changes only this thread's network namespace.
        let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
    }

    fn exec(&self, i: usize, args: &[&str]) -> (bool, String) {
        run_bounded(
            Command::new("ip").args(["netns", "exec", &self.names[i]]).args(args),
            Duration::from_secs(10),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = run_bounded(Command::new("ip").args(["netns", "del", n]), Duration::from_secs(10));
        }
    }
}

/// Turns off TX checksum offload on `dev` of this thread's namespace (what `ethtool -K dev tx
/// off` does; ethtool is not installed here). A veth peer with offload sends UDP checksums that
/// hold only the pseudo-header sum (CHECKSUM_PARTIAL): the XDP side sees them as wrong.
fn tx_checksum_off(dev: &str) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct Ifreq {
        name: [u8; 16],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    let mut v = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    let mut r = Ifreq {
        name: [0; 16],
        data: &mut v,
        _pad: [0; 16],
    };
    r.name[..dev.len()].copy_from_slice(dev.as_bytes());
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: SIOCETHTOOL reads the ifreq and the ethtool_value it points at, both live here.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), SIOCETHTOOL, &mut r) };
    assert_eq!(rc, 0, "ETHTOOL_STXCSUM on {dev}: {}", std::io::Error::last_os_error());
}

fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).unwrap();
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert_ne!(i, 0, "no interface {name}");
    i
}

/// One ICMP echo to `to` from a raw socket of this thread's namespace: whether a reply came
/// within a bounded time (no ping binary needed).
fn ping(to: Ipv4Addr) -> bool {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)).unwrap();
    // 64 bytes like ping's: long enough that the program judges it by protocol, not length.
    let mut echo = [0u8; 64];
    echo[..8].copy_from_slice(&[8, 0, 0, 0, 0x12, 0x34, 0, 1]);
    let sum = !gnomon::xdp::frame::checksum(0, &echo);
    echo[2..4].copy_from_slice(&sum.to_be_bytes());
    let dst = std::net::SocketAddr::from((to, 0));
    s.send_to(&echo, &dst.into()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 256];
    while Instant::now() < deadline {
        if let Ok(n) = s.recv(&mut b) {
            // SAFETY: recv initialised the first n bytes.
            let got: Vec<u8> = b[..n].iter().map(|x| unsafe { x.assume_init() }).collect();
            // IPv4 header (20 bytes: the kernel sends no options), then ICMP type 0 with our id.
            if n >= 28 && got[20] == 0 && got[24..26] == [0x12, 0x34] {
                return true;
            }
        }
    }
    false
}

/// Receives one datagram on `s` within a bounded time.
fn got_one(s: &UdpSocket) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    let mut b = [0u8; 128];
    s.recv_from(&mut b).is_ok()
}

#[test]
fn attached_on_veth_it_counts_and_passes_everything_without_a_socket() {
    let t = Target {
        v4: Some(SERVER4),
        v6: None,
        port: 123,
    };
    let Some(p) = load(&t) else { return };
    let Some(ns) = Netns::create() else { return };
    ns.enter(0);
    let link = match p.attach(ifindex("xs"), Mode::Native) {
        Ok(l) => l,
        Err(e) => panic!("attaching in native mode to veth: {e}"),
    };
    let (ok, out) = ns.exec(0, &["ip", "link", "show", "xs"]);
    assert!(ok && out.contains("prog/xdp"), "not attached: {out}");

    // ARP and ICMP go on to the kernel (an echo is answered); an NTP request and a datagram to
    // another port both reach kernel sockets.
    let ntp = UdpSocket::bind((SERVER4, 123)).unwrap();
    let other = UdpSocket::bind((SERVER4, 124)).unwrap();
    let ns_ref = &ns;
    let echoed = std::thread::scope(|sc| {
        sc.spawn(move || {
            ns_ref.enter(1);
            let echoed = ping(SERVER4);
            let c = UdpSocket::bind((CLIENT4, 0)).unwrap();
            c.send_to(&[0x23; 48], (SERVER4, 123)).unwrap();
            c.send_to(&[0x23; 48], (SERVER4, 124)).unwrap();
            echoed
        })
        .join()
        .unwrap()
    });
    assert!(echoed, "no ICMP echo reply through the XDP program");
    assert!(got_one(&ntp), "the request did not reach the kernel socket");
    assert!(got_one(&other), "the other port's datagram did not reach the kernel");

    let deadline = Instant::now() + Duration::from_secs(5);
    let c = loop {
        let c = p.counters().unwrap();
        if c[COUNT_NO_SOCKET as usize] >= 1 || Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    common::say(&format!("xdp counters on veth: {c:?}"));
    assert_eq!(c[COUNT_NO_SOCKET as usize], 1, "{c:?}");
    assert!(c[Pass::Port as usize] >= 1, "{c:?}");
    // The ARP request is broadcast; the echo is ICMP.
    assert!(c[Pass::GroupMac as usize] >= 1, "ARP not counted: {c:?}");
    assert!(c[Pass::NotUdp as usize] >= 1, "ICMP not counted: {c:?}");

    // Dropping the link detaches the program.
    drop(link);
    let (_, out) = ns.exec(0, &["ip", "link", "show", "xs"]);
    assert!(!out.contains("prog/xdp"), "still attached after the link closed: {out}");
}

/// The program attached to the server's veth end with one AF_XDP socket on queue 0, the calling
/// thread in the server's namespace and the client's end sending full UDP checksums; None (with
/// a SKIPPED line) where that cannot be set up here. Fields drop in order: the namespaces last.
struct Direct {
    p: Program,
    _link: gnomon::xdp::sys::Link,
    xsk: gnomon::xdp::xsk::Xsk,
    ns: Netns,
}

impl Direct {
    fn setup(t: Target) -> Option<Direct> {
        let p = load(&t)?;
        let ns = Netns::create()?;
        ns.enter(0);
        let xs = ifindex("xs");
        let link = p.attach(xs, Mode::Native).expect("attach");
        let xsk = match gnomon::xdp::xsk::Xsk::bind(xs, 0, t) {
            Ok(x) => x,
            Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
                skip(&format!("AF_XDP is not available here: {e}"));
                return None;
            }
            Err(e) => panic!("AF_XDP bind: {e}"),
        };
        p.bind_queue(0, xsk.raw_fd()).unwrap();
        let ns_ref = &ns;
        std::thread::scope(|sc| {
            sc.spawn(move || {
                ns_ref.enter(1);
                tx_checksum_off("xc");
            });
        });
        Some(Direct {
            p,
            _link: link,
            xsk,
            ns,
        })
    }
}

/// The handler the kernel path uses, serving everyone, its clock synchronised at stratum 3
/// (the publisher is returned to keep the clock state alive).
fn ntp_handler() -> (gnomon::clock::ClockPublisher, gnomon::server::ntp::NtpHandler) {
    use gnomon::clock::{self, ClockState};
    use gnomon::policy::{PolicyConfig, PolicySet, SharedPolicy};
    use gnomon::server::stats::WorkerStats;
    use std::sync::Arc;
    let (mut publisher, reader) = clock::snapshot(ClockState::unsynchronized(-24));
    publisher.publish(ClockState::local(3, -24, clock::realtime_ns()));
    let policy = Arc::new(SharedPolicy::new(PolicySet::build(PolicyConfig::default(), None)));
    let h = gnomon::server::ntp::NtpHandler::new(reader, policy, Arc::new(WorkerStats::new(0, None, "xdp")));
    (publisher, h)
}

/// With a kernel socket bound beside the AF_XDP one, a request with IP options is passed on by
/// the program and reaches the kernel socket, while a plain request is answered by AF_XDP and
/// never reaches the kernel socket.
#[test]
fn a_request_with_ip_options_goes_to_the_kernel_socket() {
    use std::os::fd::AsRawFd;
    let Some(Direct { ns, p, _link, mut xsk }) = Direct::setup(target(123)) else {
        return;
    };
    let kernel = UdpSocket::bind((SERVER4, 123)).unwrap();
    kernel.set_nonblocking(true).unwrap();
    let (_clock, mut h) = ntp_handler();

    let ns_ref = &ns;
    let client = std::thread::scope(|sc| {
        let c = sc.spawn(move || {
            ns_ref.enter(1);
            let with_options = UdpSocket::bind((CLIENT4, 0)).unwrap();
            // Four bytes of options (NOP, NOP, NOP, end of list): IHL 6.
            let opts = [1u8, 1, 1, 0];
            // SAFETY: `opts` is a live buffer of the length passed.
            let rc = unsafe {
                libc::setsockopt(
                    with_options.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_OPTIONS,
                    opts.as_ptr().cast(),
                    opts.len() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "IP_OPTIONS: {}", std::io::Error::last_os_error());
            let plain = UdpSocket::bind((CLIENT4, 0)).unwrap();
            let req = common::request(4, 3, 0x1122_3344_5566_7788);
            with_options.send_to(&req, (SERVER4, 123)).unwrap();
            plain.send_to(&req, (SERVER4, 123)).unwrap();
            (
                with_options.local_addr().unwrap(),
                plain.local_addr().unwrap(),
                got_one(&plain),
            )
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut replied, mut to_kernel) = (0, Vec::new());
        while !c.is_finished() && Instant::now() < deadline {
            replied += xsk.serve_batch(&mut h, 50).unwrap().replied;
            let mut b = [0u8; 128];
            while let Ok((_, from)) = kernel.recv_from(&mut b) {
                to_kernel.push(from);
            }
        }
        let mut b = [0u8; 128];
        kernel.set_nonblocking(false).unwrap();
        kernel.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        while let Ok((_, from)) = kernel.recv_from(&mut b) {
            to_kernel.push(from);
        }
        (c.join().unwrap(), replied, to_kernel)
    });
    let ((with_options, plain, plain_answered), replied, to_kernel) = client;
    let c = p.counters().unwrap();
    common::say(&format!("xdp counters: {c:?}; kernel socket got {to_kernel:?}"));
    assert_eq!(to_kernel, vec![with_options], "what reached the kernel socket");
    assert!(
        plain_answered && replied == 1,
        "the plain request {plain} was not answered by AF_XDP"
    );
    assert_eq!(c[Pass::IpHeader as usize], 1, "{c:?}");
}

/// One real client (ntpdig, in the other namespace) gets its answer from the AF_XDP socket over
/// IPv4 and IPv6: no kernel socket listens on port 123 in the server's namespace, so only that
/// path can answer; the client's kernel checks our checksums. ARP and ND pass to the kernel.
#[test]
fn ntpdig_is_answered_through_the_af_xdp_socket() {
    use gnomon::xdp::frame::COUNT_REDIRECTED;

    const NTPDIG: &str = "/usr/bin/ntpdig";
    if !common::have_tool(NTPDIG) {
        return;
    }
    let Some(Direct { ns, p, _link, mut xsk }) = Direct::setup(target(123)) else {
        return;
    };
    // veth has no zero-copy: the attempt fell back to copy mode, with need-wakeup kept.
    assert!(!xsk.zero_copy(), "zero-copy on veth?");
    assert!(xsk.need_wakeup(), "bound without XDP_USE_NEED_WAKEUP");
    let (_clock, mut h) = ntp_handler();
    for server in [SERVER4.to_string(), SERVER6.to_string()] {
        let before = p.counters().unwrap()[COUNT_REDIRECTED as usize];
        let client_ns = ns.names[1].clone();
        let client = std::thread::spawn(move || {
            run_bounded(
                Command::new("ip")
                    .args(["netns", "exec", &client_ns, NTPDIG, "-j", "-t", "2"])
                    .arg(server),
                Duration::from_secs(10),
            )
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        let (mut replied, mut received, mut malformed, mut stamped) = (0, 0, 0, 0);
        let mut allocs = 0;
        while !client.is_finished() && Instant::now() < deadline {
            let (r, n) = common::alloc::allocations(|| xsk.serve_batch(&mut h, 100).unwrap());
            allocs += n;
            replied += r.replied;
            received += r.received;
            malformed += r.malformed;
            stamped += r.stamped;
            assert!(
                r.kicks <= r.replied.div_ceil(32) && (r.replied > 0 || r.kicks == 0),
                "kicks per batch: {r:?}"
            );
        }
        let (ok, out) = client.join().unwrap();
        let c = p.counters().unwrap();
        common::say(&format!(
            "xdp counters: {c:?}; AF_XDP received {received}, malformed {malformed}, replied \
             {replied}, T2 from the program {stamped}"
        ));
        assert!(ok, "ntpdig failed:\n{out}");
        assert_eq!(allocs, 0, "the AF_XDP serving loop allocated");
        assert!(replied >= 1 && c[COUNT_REDIRECTED as usize] > before, "{c:?}");
        assert_eq!(stamped, received, "T2 missing from the metadata");
        let st = xsk.stats().unwrap();
        assert_eq!((st.rx_dropped, st.rx_ring_full), (0, 0), "{st:?}");
        let v: serde_json::Value =
            serde_json::from_str(out.lines().find(|l| l.starts_with('{')).expect("json line")).unwrap();
        assert_eq!(v["stratum"], 3, "{out}");
        assert!(v["offset"].as_f64().unwrap().abs() < 0.01, "{out}");
    }
}

/// The child of [`a_killed_owner_leaves_no_program_and_the_next_attach_works`]: attaches the
/// program in the namespace it is given and waits to be killed. Not a test of its own.
#[test]
#[ignore = "run only as the child of a_killed_owner_leaves_no_program_and_the_next_attach_works"]
fn child_attaches_and_waits() {
    let Ok(name) = std::env::var("GNOMON_XDP_CHILD_NS") else {
        return;
    };
    let p = Program::load(&target(123), 1).unwrap();
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: setns on an open namespace fd changes only this thread's network namespace.
    assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    let _link = p.attach(ifindex("xs"), Mode::Native).unwrap();
    println!("ATTACHED");
    std::thread::sleep(Duration::from_secs(30));
}

/// A bpf_link belongs to its process: SIGKILL detaches the program, the next start attaches
/// afresh, and a second attach while one is attached is refused rather than stacked.
#[test]
fn a_killed_owner_leaves_no_program_and_the_next_attach_works() {
    use std::io::BufRead;
    let Some(p) = load(&target(123)) else { return };
    let Some(ns) = Netns::create() else { return };
    let attached = || ns.exec(0, &["ip", "link", "show", "xs"]).1.contains("prog/xdp");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_attaches_and_waits", "--exact", "--ignored", "--nocapture"])
        .env("GNOMON_XDP_CHILD_NS", &ns.names[0])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if l.contains("ATTACHED") {
                let _ = tx.send(());
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(20)).is_ok();
    let was_attached = attached();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ready && was_attached, "the child did not attach");
    let deadline = Instant::now() + Duration::from_secs(5);
    while attached() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!attached(), "the program stayed attached after its owner was killed");

    ns.enter(0);
    let xs = ifindex("xs");
    let _link = p.attach(xs, Mode::Native).expect("attach after the crash");
    assert!(attached());
    let second = load(&target(123)).unwrap();
    let e = second
        .attach(xs, Mode::Native)
        .err()
        .expect("a second program was stacked");
    common::say(&format!("second attach refused: {e}"));
}

/// Sends `n` requests to the server from 16 client sockets in turn (many source ports, so
/// many flows), from inside the client namespace.
fn send_burst(n: usize) -> Vec<UdpSocket> {
    let socks: Vec<UdpSocket> = (0..16).map(|_| UdpSocket::bind((CLIENT4, 0)).unwrap()).collect();
    for i in 0..n {
        socks[i % socks.len()]
            .send_to(&common::request(4, 3, i as u64 + 1), (SERVER4, 123))
            .unwrap();
    }
    socks
}

/// Replies waiting on `socks`, each read until `quiet` passes without one.
fn drain(socks: &[UdpSocket], quiet: Duration) -> usize {
    let mut got = 0;
    for s in socks {
        s.set_read_timeout(Some(quiet)).unwrap();
        let mut b = [0u8; 128];
        while s.recv_from(&mut b).is_ok() {
            got += 1;
        }
    }
    got
}

/// A burst from many source ports is answered in batches of more than one request with no
/// allocation in the serving loop (as tests/no_alloc.rs checks the kernel backends).
#[test]
fn a_burst_is_answered_in_batches_without_allocating() {
    // Held whole: its program and link stay attached while the test runs.
    let Some(mut d) = Direct::setup(target(123)) else {
        return;
    };
    let (_clock, mut h) = ntp_handler();
    const N: usize = 400;
    let ns_ref = &d.ns;
    let (answered, results, allocs) = std::thread::scope(|sc| {
        let c = sc.spawn(move || {
            ns_ref.enter(1);
            let socks = send_burst(N);
            drain(&socks, Duration::from_millis(500))
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        let (mut results, mut allocs) = (Vec::with_capacity(4 * N), 0);
        while !c.is_finished() && Instant::now() < deadline {
            let (r, n) = common::alloc::allocations(|| d.xsk.serve_batch(&mut h, 20).unwrap());
            allocs += n;
            if r.received > 0 && results.len() < results.capacity() {
                results.push(r);
            }
        }
        (c.join().unwrap(), results, allocs)
    });
    let replied: usize = results.iter().map(|r| r.replied).sum();
    let biggest = results.iter().map(|r| r.received).max().unwrap_or(0);
    common::say(&format!(
        "burst of {N}: {replied} replies in {} batches (largest {biggest}), client got {answered}",
        results.len()
    ));
    assert_eq!(allocs, 0, "the AF_XDP serving loop allocated");
    assert_eq!((replied, answered), (N, N));
    assert!(biggest > 1, "every batch held one request: no batching");
    assert!(
        results.iter().all(|r| r.kicks <= r.replied.div_ceil(32).max(1)),
        "more TX kicks than one per 32 replies in a batch"
    );
}

/// A full batch of requests, queued before the worker looks, leaves in full with that batch's
/// own kicks: copy mode sends at most 32 frames per sendto, and a tail left in the TX ring would
/// go out only with the next batch's syscall, later than its T3 says (or never, when no more
/// requests come).
#[test]
fn a_full_batch_leaves_with_its_own_kicks() {
    // Held whole: its program and link stay attached while the test runs.
    let Some(mut d) = Direct::setup(target(123)) else {
        return;
    };
    let (_clock, mut h) = ntp_handler();
    const N: usize = gnomon::xdp::xsk::BATCH;
    let ns_ref = &d.ns;
    let (sent, got, r) = std::thread::scope(|sc| {
        let (queued_tx, queued_rx) = std::sync::mpsc::channel();
        let (served_tx, served_rx) = std::sync::mpsc::channel();
        let c = sc.spawn(move || {
            ns_ref.enter(1);
            let socks = send_burst(N);
            queued_tx.send(()).unwrap();
            // Nothing is served after the one batch: what arrives left with that batch.
            served_rx.recv_timeout(Duration::from_secs(10)).unwrap();
            drain(&socks, Duration::from_millis(300))
        });
        queued_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        // The program fills the RX ring without the worker: wait until all of them are there.
        std::thread::sleep(Duration::from_millis(300));
        let r = d.xsk.serve_batch(&mut h, 100).unwrap();
        served_tx.send(()).unwrap();
        (N, c.join().unwrap(), r)
    });
    common::say(&format!(
        "one batch: received {}, replied {}, kicks {}, client got {got}",
        r.received, r.replied, r.kicks
    ));
    assert_eq!((r.received, r.replied), (sent, sent), "the batch did not take them all");
    assert_eq!(got, sent, "part of the batch's replies stayed in the TX ring");
}

/// `chronyd -Q -x` in the client namespace accepts the AF_XDP path's replies on both families.
#[test]
fn chronyd_accepts_replies_from_the_af_xdp_path() {
    if !common::have_tool(common::CHRONYD) {
        return;
    }
    let Some(Direct { ns, _link, mut xsk, .. }) = Direct::setup(target(123)) else {
        return;
    };
    let (_clock, mut h) = ntp_handler();
    let dir = common::tempdir("xdp-chrony");
    let ns_ref = &ns;
    for server in [std::net::IpAddr::V4(SERVER4), std::net::IpAddr::V6(SERVER6)] {
        let dir = dir.join(if server.is_ipv4() { "v4" } else { "v6" });
        std::fs::create_dir_all(&dir).unwrap();
        let (out, replied) = std::thread::scope(|sc| {
            let c = sc.spawn(|| {
                ns_ref.enter(1);
                common::chrony_client((server, 123).into(), &dir, 8)
            });
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut replied = 0;
            while !c.is_finished() && Instant::now() < deadline {
                replied += xsk.serve_batch(&mut h, 50).unwrap().replied;
            }
            (c.join().unwrap(), replied)
        });
        let offset = common::chrony_offset(&out);
        common::say(&format!(
            "chronyd via AF_XDP ({server}): {replied} replies, offset {offset:?}"
        ));
        assert!(replied >= 1, "{out}");
        assert!(
            offset.is_some_and(|o| o.abs() < 0.01),
            "chronyd did not accept the replies:\n{out}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `f` on a thread of its own in the client's namespace.
fn in_client<R: Send>(ns: &Netns, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|sc| {
        sc.spawn(|| {
            ns.enter(1);
            f()
        })
        .join()
        .unwrap()
    })
}

/// The config of a gnomon serving on the server's veth end with `io`, on both families at port
/// 123, synchronised (LOCAL stratum 3); `top` goes before the tables, `tables` after.
fn config(io: &str, top: &str, tables: &str) -> String {
    let xdp = if io == "xdp" { "[xdp]\ninterface = \"xs\"\n" } else { "" };
    format!(
        "listen = [\"{SERVER4}:123\", \"[{SERVER6}]:123\"]\nio = \"{io}\"\nworkers = 1\nlocal_stratum = 3\n{top}{tables}{xdp}"
    )
}

/// `gnomon serve` in the server's namespace.
fn serve_in(ns: &Netns, cfg: &str) -> common::Gnomon {
    common::Gnomon::start_via(&["ip", "netns", "exec", &ns.names[0]], cfg, &[])
}

/// Waits until [`CLIENT4`] gets an answer from the server (at most 15 s): the first requests
/// after a namespace is made can wait seconds (seen here on a loaded machine, on both paths).
/// Returns how many requests that took.
fn wait_answering(ns: &Netns) -> u64 {
    in_client(ns, || {
        let s = UdpSocket::bind((CLIENT4, 0)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut sent = 0;
        loop {
            sent += 1;
            if outcome(&s, (SERVER4, 123).into(), 1).is_some() {
                return sent;
            }
            assert!(Instant::now() < deadline, "no answer within 15 s");
        }
    })
}

/// The workers of `stats --json` whose backend is (or is not) AF_XDP, as (received, answered).
fn workers(srv: &common::Gnomon, xdp: bool) -> Vec<(u64, u64)> {
    workers_of(&srv.stats(), xdp)
}

fn workers_of(s: &serde_json::Value, xdp: bool) -> Vec<(u64, u64)> {
    s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| (w["backend"] == "xdp") == xdp)
        .map(|w| {
            let c = &w["counters"];
            (c["received"].as_u64().unwrap(), c["answered"].as_u64().unwrap())
        })
        .collect()
}

/// One exchange from `from` (port 0: any) to `to`; the reply's refid text for a Kiss-o'-Death,
/// "time" for a normal reply, None for no reply within 400 ms.
fn outcome(sock: &UdpSocket, to: std::net::SocketAddr, transmit: u64) -> Option<String> {
    use gnomon::proto::Header;
    sock.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
    sock.send_to(&common::request(4, 3, transmit), to).unwrap();
    let mut b = [0u8; 128];
    let deadline = Instant::now() + Duration::from_millis(400);
    while Instant::now() < deadline {
        let Ok((n, _)) = sock.recv_from(&mut b) else {
            return None;
        };
        let h = Header::decode(&b[..n]).unwrap();
        if h.origin_timestamp.0 != transmit {
            continue;
        }
        return Some(if h.stratum == 0 {
            String::from_utf8_lossy(&h.reference_id.0).into_owned()
        } else {
            "time".to_string()
        });
    }
    None
}

fn tcp_works(to: std::net::SocketAddr) -> bool {
    use std::io::Read;
    let Ok(mut c) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3)) else {
        return false;
    };
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut b = [0u8; 5];
    c.read_exact(&mut b).is_ok() && &b == b"hello"
}

/// The whole server on `io = "xdp"`: every request from 64 source ports is answered over both
/// families, by the AF_XDP workers of both RX queues (none reaches a kernel socket), while ARP,
/// ND, ping and TCP to the same addresses go on to the kernel; after SIGKILL a restart attaches
/// again (one program, never stacked) and serves.
#[test]
fn gnomon_serves_through_af_xdp_on_every_rx_queue() {
    use std::io::Write;
    if load(&target(123)).is_none() {
        return;
    }
    let Some(ns) = Netns::with_queues(2) else { return };
    in_client(&ns, || tx_checksum_off("xc"));
    let cfg = config(
        "xdp",
        "",
        "[[restrict]]\naddress = \"198.18.0.0/15\"\naction = \"exempt\"\n[[restrict]]\naddress = \"2001:2::/48\"\naction = \"exempt\"\n\
         [metrics]\nlisten = \"127.0.0.1:9975\"\n",
    );
    let mut srv = serve_in(&ns, &cfg);
    let warm = wait_answering(&ns);
    let started = srv.startup_log.join("\n");
    assert!(
        started.contains("AF_XDP on xs: RX queues [0, 1]"),
        "no AF_XDP start line:\n{started}"
    );
    // A TCP service on the same addresses, in the server's namespace.
    let tcp = std::thread::scope(|sc| {
        sc.spawn(|| {
            ns.enter(0);
            [
                std::net::TcpListener::bind((SERVER4, 0)).unwrap(),
                std::net::TcpListener::bind((SERVER6, 0)).unwrap(),
            ]
        })
        .join()
        .unwrap()
    });
    let tcp_addrs: Vec<_> = tcp.iter().map(|l| l.local_addr().unwrap()).collect();
    let acceptor = std::thread::spawn(move || {
        for l in &tcp {
            l.set_nonblocking(false).unwrap();
            if let Ok((mut c, _)) = l.accept() {
                let _ = c.write_all(b"hello");
            }
        }
    });
    let (answered, v6, pinged, tcp_ok) = in_client(&ns, || {
        let socks: Vec<UdpSocket> = (0..64).map(|_| UdpSocket::bind((CLIENT4, 0)).unwrap()).collect();
        let answered = socks
            .iter()
            .enumerate()
            .filter(|(i, s)| outcome(s, (SERVER4, 123).into(), 1000 + *i as u64).as_deref() == Some("time"))
            .count();
        // IPv6 needs ND from the server's kernel first.
        let s6 = UdpSocket::bind((CLIENT6, 0)).unwrap();
        let v6 = outcome(&s6, (SERVER6, 123).into(), 7);
        let tcp_ok = tcp_addrs.iter().all(|a| tcp_works(*a));
        (answered, v6, ping(SERVER4), tcp_ok)
    });
    acceptor.join().unwrap();
    assert_eq!(answered, 64, "IPv4 requests answered");
    assert_eq!(v6.as_deref(), Some("time"), "IPv6 request");
    assert!(pinged, "no ICMP echo reply beside AF_XDP");
    assert!(tcp_ok, "TCP to the served addresses failed");
    srv.wait_counter("answered", 65 + warm);
    let x = workers(&srv, true);
    let k = workers(&srv, false);
    common::say(&format!(
        "AF_XDP workers (received, answered): {x:?}; kernel workers: {k:?}"
    ));
    assert_eq!(x.len(), 2, "one AF_XDP worker per RX queue");
    assert!(x.iter().all(|w| w.1 >= 1), "a queue's worker answered nothing: {x:?}");
    assert_eq!(x.iter().map(|w| w.1).sum::<u64>(), 65 + warm);
    assert!(k.iter().all(|w| w.0 == 0), "requests reached a kernel socket: {k:?}");
    // The program's own verdicts and the sockets' kernel counters, in stats and metrics.
    let st = srv.stats();
    let program = &st["xdp"]["program"];
    assert!(program["redirected"].as_u64().unwrap() >= 65 + warm, "{program}");
    assert!(
        program["passed_not_udp"].as_u64().unwrap() >= 1 && program["passed_short"].as_u64().unwrap() >= 1,
        "ping (not UDP) and TCP (bare segments, shorter than a request): {program}"
    );
    assert!(program["passed_group_mac"].as_u64().unwrap() >= 1, "ARP/ND: {program}");
    let sockets = st["xdp"]["sockets"].as_array().unwrap();
    assert_eq!(sockets.len(), 2, "{}", st["xdp"]);
    assert!(
        sockets.iter().all(|s| s["rx_ring_full"] == 0 && s["bad_checksum"] == 0),
        "{}",
        st["xdp"]
    );
    let text = String::from_utf8_lossy(&srv.ctl(&["stats"]).stdout).into_owned();
    assert!(
        text.contains("AF_XDP on xs (copy mode)") && text.contains("redirected"),
        "{text}"
    );
    let scrape = std::thread::scope(|sc| {
        sc.spawn(|| {
            use std::io::Read;
            ns.enter(0);
            let mut c = std::net::TcpStream::connect("127.0.0.1:9975").unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            out
        })
        .join()
        .unwrap()
    });
    assert!(
        scrape.contains("gnomon_xdp_program_packets_total{interface=\"xs\",verdict=\"redirected\"}")
            && scrape.contains("gnomon_xdp_rx_ring_full_total{interface=\"xs\",queue=\"1\"} 0")
            && scrape.contains("backend=\"xdp\""),
        "{scrape}"
    );
    let attached = || ns.exec(0, &["ip", "link", "show", "xs"]).1.matches("prog/xdp").count();
    assert_eq!(attached(), 1);

    // SIGKILL: the kernel detaches the program with the process; the next start attaches again.
    srv.child.kill().unwrap();
    srv.child.wait().unwrap();
    drop(srv);
    let deadline = Instant::now() + Duration::from_secs(5);
    while attached() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let srv = serve_in(&ns, &cfg);
    let started = srv.startup_log.join("\n");
    assert!(started.contains("AF_XDP on xs"), "restart fell back:\n{started}");
    assert_eq!(attached(), 1);
    wait_answering(&ns);
    let x = workers(&srv, true);
    assert!(
        x.iter().map(|w| w.1).sum::<u64>() >= 1,
        "not answered by AF_XDP after the restart: {x:?}"
    );
}

/// The bad-input corpus of tests/serve.rs gets no reply on the AF_XDP path either; what is long
/// enough for the program reaches the AF_XDP worker and is dropped there for the same reasons.
#[test]
fn the_bad_input_corpus_gets_no_reply_through_af_xdp() {
    if load(&target(123)).is_none() {
        return;
    }
    let Some(ns) = Netns::create() else { return };
    in_client(&ns, || tx_checksum_off("xc"));
    let srv = serve_in(&ns, &config("xdp", "", ""));
    wait_answering(&ns);
    srv.wait_counter("answered", 1);
    std::thread::sleep(Duration::from_millis(300));
    let before = srv.stats();
    let corpus = common::bad_input_corpus();
    let answered = in_client(&ns, || {
        let s = UdpSocket::bind((CLIENT4, 0)).unwrap();
        for (bytes, _) in &corpus {
            s.send_to(bytes, (SERVER4, 123)).unwrap();
        }
        got_one(&s)
    });
    assert!(!answered, "bad input was answered");
    let received = before["total"]["counters"]["received"].as_u64().unwrap();
    srv.wait_counter("received", received + corpus.len() as u64);
    let stats = srv.stats();
    let delta = |name: &str| {
        let c = |s: &serde_json::Value| s["total"]["counters"][name].as_u64().unwrap();
        c(&stats) - c(&before)
    };
    let mut expected = std::collections::BTreeMap::<&str, u64>::new();
    for (_, reason) in &corpus {
        *expected.entry(reason).or_default() += 1;
    }
    for (reason, n) in &expected {
        assert_eq!(delta(reason), *n, "counter {reason}");
    }
    assert_eq!(delta("answered"), 0);
    // What the program takes (48 bytes and more) reached the AF_XDP worker.
    let long = corpus.iter().filter(|(b, _)| b.len() >= 48).count() as u64;
    let xdp_received = |s: &serde_json::Value| workers_of(s, true).iter().map(|w| w.0).sum::<u64>();
    assert_eq!(xdp_received(&stats) - xdp_received(&before), long, "AF_XDP workers");
    let ok = in_client(&ns, || {
        let s = UdpSocket::bind((CLIENT4, 0)).unwrap();
        outcome(&s, (SERVER4, 123).into(), 5)
    });
    assert_eq!(ok.as_deref(), Some("time"), "a valid request right after");
}

/// Access rules (ignore, deny, limited), KoD DENY and RATE and the rate limiter give the same
/// answers, request for request, on the AF_XDP path as on the kernel path.
#[test]
fn access_rules_and_rate_limits_behave_as_on_the_kernel_path() {
    if load(&target(123)).is_none() {
        return;
    }
    let Some(ns) = Netns::create() else { return };
    in_client(&ns, || tx_checksum_off("xc"));
    let [ignored, denied, limited] = CLIENTS4;
    let rules = format!(
        "[[restrict]]\naddress = \"{ignored}/32\"\naction = \"ignore\"\n\
         [[restrict]]\naddress = \"{denied}/32\"\naction = \"deny\"\n\
         [[restrict]]\naddress = \"{limited}/32\"\naction = \"limited\"\n\
         [rate_limit]\ninterval = 8.0\nburst = 3\nleak = 0\nkod = true\n"
    );
    let mut seen = Vec::new();
    for io in ["mmsg", "xdp"] {
        let srv = serve_in(&ns, &config(io, "", &rules));
        wait_answering(&ns);
        std::thread::sleep(Duration::from_millis(300));
        let x0: u64 = workers(&srv, true).iter().map(|w| w.0).sum();
        let got: Vec<Vec<Option<String>>> = in_client(&ns, || {
            [ignored, denied, limited]
                .iter()
                .map(|a| {
                    let s = UdpSocket::bind((*a, 0)).unwrap();
                    (0..6).map(|i| outcome(&s, (SERVER4, 123).into(), 100 + i)).collect()
                })
                .collect()
        });
        // A worker publishes its counters every 200 ms or when it goes idle: wait for that.
        let mut x = workers(&srv, true);
        let deadline = Instant::now() + Duration::from_secs(3);
        while io == "xdp" && x.iter().map(|w| w.0).sum::<u64>() - x0 < 18 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            x = workers(&srv, true);
        }
        common::say(&format!(
            "{io}: {got:?}; AF_XDP workers {x:?}, kernel workers {:?}; {}",
            workers(&srv, false),
            ns.exec(0, &["ip", "-s", "link", "show", "xs"]).1
        ));
        if io == "xdp" {
            assert_eq!(
                x.iter().map(|w| w.0).sum::<u64>() - x0,
                18,
                "not served by AF_XDP: {x:?}"
            );
        }
        seen.push(got);
    }
    // The same rules on both paths. Which of the later requests get a kiss depends on the KoD
    // limiter's refill and so on timing (seen: a DENY on the 6th request on one path only), so
    // each path is held to the same rules rather than to the other's exact sequence.
    for (io, got) in ["mmsg", "xdp"].iter().zip(&seen) {
        let [ig, de, li] = &got[..] else { unreachable!() };
        assert!(ig.iter().all(Option::is_none), "{io}: ignored: {ig:?}");
        assert_eq!(de[0].as_deref(), Some("DENY"), "{io}: denied: {de:?}");
        assert!(
            de.iter().all(|o| o.as_deref().is_none_or(|k| k == "DENY")),
            "{io}: denied: {de:?}"
        );
        assert!(
            li[..3].iter().all(|o| o.as_deref() == Some("time")),
            "{io}: limited: {li:?}"
        );
        assert!(
            li[3..].contains(&Some("RATE".to_string())),
            "{io}: no KoD RATE over the limit: {li:?}"
        );
        assert!(
            li[3..].iter().all(|o| o.as_deref().is_none_or(|k| k == "RATE")),
            "{io}: limited: {li:?}"
        );
    }
}

/// Each reason the AF_XDP path cannot be used that this machine can produce is said in one line,
/// and the kernel sockets serve; with `required = true` the start is refused instead.
#[test]
fn without_af_xdp_gnomon_says_why_and_serves_through_the_kernel() {
    let fallback = |srv: &common::Gnomon, why: &str| {
        let log = srv.startup_log.join("\n");
        let line = log
            .lines()
            .find(|l| l.contains("serving through the kernel sockets only"))
            .unwrap_or_else(|| panic!("no fallback line:\n{log}"));
        assert!(line.contains(why), "expected `{why}` in: {line}");
        common::say(&format!("fallback: {line}"));
    };
    // A missing interface (no privilege needed to find that out).
    let missing = "io = \"xdp\"\nlocal_stratum = 3\n[xdp]\ninterface = \"gnomon-none0\"\n";
    let srv = common::Gnomon::start(missing);
    fallback(&srv, "AF_XDP on gnomon-none0: no such interface");
    let s = common::client(srv.addr());
    assert!(common::exchange(&s, srv.addr(), &common::request(4, 3, 1)).is_some());
    drop(srv);
    // Refused instead.
    let dir = common::tempdir("xdp-required");
    let path = dir.join("gnomon.toml");
    std::fs::write(
        &path,
        format!(
            "control_socket = \"{}\"\nlisten = [\"127.0.0.1:0\"]\n{missing}required = true\n",
            dir.join("c.sock").display()
        ),
    )
    .unwrap();
    let (ok, out) = run_bounded(
        Command::new(common::GNOMON).arg("serve").arg("--config").arg(&path),
        Duration::from_secs(10),
    );
    assert!(
        !ok && out.contains("no such interface") && out.contains("required = true"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    if load(&target(123)).is_none() {
        return;
    }
    let Some(ns) = Netns::create() else { return };
    // An interface whose driver has no native XDP: loopback.
    let lo = "listen = [\"127.0.0.1:0\"]\nio = \"xdp\"\nlocal_stratum = 3\n[xdp]\ninterface = \"lo\"\n";
    let srv = serve_in(&ns, lo);
    fallback(&srv, "AF_XDP on lo: the driver has no native XDP");
    drop(srv);
    // A queue the interface does not have: the program is detached again, not left behind.
    let srv = serve_in(&ns, &config("xdp", "", "").replace("[xdp]\n", "[xdp]\nqueues = [3]\n"));
    fallback(&srv, "AF_XDP on xs: binding an AF_XDP socket to queue 3");
    assert!(!ns.exec(0, &["ip", "link", "show", "xs"]).1.contains("prog/xdp"));
    wait_answering(&ns);
    drop(srv);
    // Without the capabilities (root, but with CAP_BPF, CAP_SYS_ADMIN and CAP_NET_ADMIN gone).
    let srv = common::Gnomon::start_via(
        &[
            "ip",
            "netns",
            "exec",
            &ns.names[0],
            "setpriv",
            "--bounding-set=-bpf,-sys_admin,-net_admin,-perfmon",
            "--inh-caps=-all",
        ],
        &config("xdp", "", ""),
        &[],
    );
    fallback(&srv, "not permitted to load an XDP program");
    wait_answering(&ns);
    drop(srv);
    // A kernel without AF_XDP (socket(AF_XDP) refused as such a kernel does, by a seccomp
    // filter on gnomon alone).
    let dir = common::tempdir("xdp-noaf");
    let control = dir.join("control.sock");
    let path = dir.join("gnomon.toml");
    std::fs::write(
        &path,
        format!("control_socket = \"{}\"\n{}", control.display(), config("xdp", "", "")),
    )
    .unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.names[0], common::GNOMON, "serve", "--config"])
        .arg(&path);
    if common::deny_syscall(&mut cmd, libc::SYS_socket, Some(44), libc::EAFNOSUPPORT) {
        let srv = common::Gnomon::launch(cmd, dir, control);
        fallback(&srv, "AF_XDP on xs: this kernel has no AF_XDP sockets");
        assert!(!ns.exec(0, &["ip", "link", "show", "xs"]).1.contains("prog/xdp"));
        wait_answering(&ns);
    }
    // Another tool's program on the interface: left alone, never stacked or replaced.
    ns.enter(0);
    let other = load(&target(123)).unwrap();
    let _held = other.attach(ifindex("xs"), Mode::Native).unwrap();
    let srv = serve_in(&ns, &config("xdp", "", ""));
    fallback(&srv, "already has an XDP program that is not gnomon's");
    assert_eq!(
        ns.exec(0, &["ip", "link", "show", "xs"]).1.matches("prog/xdp").count(),
        1
    );
}

/// `gnomon-load --xdp`: the generator's own AF_XDP socket sends the requests and takes the
/// replies (gnomon on io_uring in the other namespace answers through its kernel), every reply
/// valid and matched: in this mode the generator reads nothing but its AF_XDP socket.
#[test]
fn gnomon_load_sends_and_receives_through_af_xdp() {
    if load(&target(123)).is_none() {
        return;
    }
    let Some(ns) = Netns::create() else { return };
    // The replies reach the generator's socket as frames with the checksums the server's end
    // wrote: full ones, as a NIC would put on the wire.
    std::thread::scope(|sc| {
        sc.spawn(|| {
            ns.enter(0);
            tx_checksum_off("xs");
        });
    });
    let srv = serve_in(&ns, &config("uring", "", ""));
    wait_answering(&ns);
    let cfg = gnomon_load::RunConfig {
        target: std::net::SocketAddrV4::new(SERVER4, 123),
        allow_remote: true,
        xdp: Some("xc".into()),
        shape: gnomon_load::Shape::Fixed { rate: 2000.0 },
        duration: Duration::from_secs(1),
        max_packets: 2_000,
        clients: 1,
        progress: false,
        ..gnomon_load::RunConfig::default()
    };
    let report = in_client(&ns, || gnomon_load::run(&cfg)).expect("gnomon-load --xdp");
    common::say(&format!(
        "gnomon-load --xdp: sent {}, replies {}, good {}, invalid {:?}",
        report.sent, report.replies, report.good, report.invalid
    ));
    assert!(report.sent >= 1_900, "sent only {}", report.sent);
    assert_eq!(report.invalid_total, 0, "{:?}", report.invalid);
    assert_eq!(report.replies, report.sent, "loss {} %", report.loss_pct);
    assert_eq!(report.good, report.sent);
    let answered: u64 = workers(&srv, false).iter().map(|w| w.1).sum();
    assert!(answered >= report.sent, "the server answered {answered}");
}

//! The per-core workers: sockets in one SO_REUSEPORT group, an I/O backend per worker, and the
//! [`Handler`] that decides what each datagram gets. The only `unsafe` of the crate lives here.

pub mod echo;
pub mod listeners;
pub mod mmsg;
pub mod ntp;
pub mod privileges;
pub mod socket;
pub mod stats;
pub mod steering;
pub mod uring;
pub mod xdp;

use socket::{SocketOptions, bind_udp};
use socket2::Socket;
use stats::WorkerStats;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

/// One received datagram, handed to the handler in its receive buffer.
pub struct Datagram<'a> {
    /// The whole receive buffer; the request is `buf[..len]` and the reply is written over it.
    pub buf: &'a mut [u8],
    pub len: usize,
    /// The datagram was longer than the buffer.
    pub truncated: bool,
    pub peer: SocketAddr,
    /// Kernel receive timestamp (CLOCK_REALTIME ns), T2 before correction.
    pub rx_realtime_ns: Option<i64>,
    /// Where the datagram was sent (IP_PKTINFO / IPV6_PKTINFO), if the kernel said.
    pub destination: Option<crate::proto::Destination>,
}

/// T3 for a batch: one clock read, shared by every reply of the batch.
#[derive(Clone, Copy, Debug)]
pub struct TxStamp {
    pub realtime_ns: i64,
    pub ntp: crate::proto::NtpTimestamp,
}

/// What a backend calls, in this order, for every batch. Implementations must not allocate,
/// lock, log or make syscalls per datagram.
pub trait Handler {
    fn begin_batch(&mut self);
    /// Writes the reply into `d.buf` and returns its length, or 0 to send nothing.
    fn handle(&mut self, d: Datagram<'_>) -> usize;
    /// Called once after every reply of the batch is built, just before the send.
    fn transmit_stamp(&mut self) -> TxStamp;
    /// Finishes one reply with the batch's T3.
    fn stamp(&mut self, reply: &mut [u8], rx_realtime_ns: i64, tx: &TxStamp);
    /// `n` replies the kernel refused to send, for `reason`.
    fn send_failed(&mut self, reason: socket::SendError, n: usize);
    /// The kernel dropped `n` datagrams on a full receive queue (SO_RXQ_OVFL); once per batch.
    fn rx_queue_dropped(&mut self, n: u64);
    fn end_batch(&mut self, received: usize, replied: usize);
    /// The receive timed out with nothing to do.
    fn idle(&mut self);
}

/// Which I/O backend the workers use.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IoMode {
    /// io_uring where the kernel allows it, else mmsg.
    Auto,
    Uring,
    /// io_uring for the replies too (one `SendMsg` per reply) instead of `sendmmsg`.
    UringSend,
    Mmsg,
    /// AF_XDP on `[xdp] interface` beside kernel sockets on the `auto` backend.
    Xdp,
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" | "io_uring" => Ok(IoMode::Uring),
            "uring-send" => Ok(IoMode::UringSend),
            "mmsg" => Ok(IoMode::Mmsg),
            "xdp" => Ok(IoMode::Xdp),
            _ => Err(format!(
                "unknown io backend `{s}` (expected auto, uring, uring-send, mmsg or xdp)"
            )),
        }
    }
}

/// How to run the workers.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: Vec<SocketAddr>,
    /// 0 = one per CPU.
    pub workers: usize,
    pub io: IoMode,
    /// CPUs to pin workers to, in order; empty = all CPUs the process may use.
    pub cpus: Vec<usize>,
    pub socket: SocketOptions,
    pub steering: steering::Steering,
    /// `[xdp]`, used when `io` is [`IoMode::Xdp`].
    pub xdp: Option<xdp::XdpOptions>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            listen: vec![],
            workers: 0,
            io: IoMode::Auto,
            cpus: vec![],
            socket: SocketOptions {
                // A few milliseconds of traffic at a few hundred thousand requests/s: enough to
                // ride out a scheduling hiccup, small enough that overload shows as drops
                // rather than as tens of milliseconds of queueing (DESIGN section 8).
                recv_buffer: 4 << 20,
                send_buffer: 4 << 20,
                read_timeout: Some(Duration::from_millis(100)),
                nonblocking: false,
            },
            steering: steering::Steering::Source,
            xdp: None,
        }
    }
}

/// True when a socket is bound to a wildcard address, so replies must name their source.
pub fn needs_pktinfo(sock: &Socket) -> bool {
    sock.local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .is_some_and(|a| a.ip().is_unspecified())
}

/// The running workers.
pub struct Server {
    pub local_addrs: Vec<SocketAddr>,
    pub stats: Vec<Arc<WorkerStats>>,
    pub backend: &'static str,
    /// Workers on the kernel sockets (the first of `stats`).
    pub kernel_workers: usize,
    /// The AF_XDP path's counters when it runs (its workers are the last of `stats`).
    pub xdp: Option<Arc<xdp::XdpCounters>>,
    /// Keeps the XDP program attached while the server runs.
    _xdp_link: Option<crate::xdp::sys::Link>,
    /// `None` once joined.
    threads: Vec<Option<JoinHandle<io::Result<()>>>>,
    /// Each worker sends its index here when it ends, however it ends.
    exits: mpsc::Receiver<usize>,
}

/// Tells the supervisor that a worker ended: dropped when the worker's thread returns or unwinds.
struct ExitNotice {
    worker: usize,
    tx: mpsc::Sender<usize>,
}

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let _ = self.tx.send(self.worker);
    }
}

impl Server {
    /// Waits up to `timeout` for a worker to end, and says why it did. Before `stop` a worker
    /// only ends when something went wrong, so any end is an error.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<io::Error> {
        // A plain sleep, not `recv_timeout`: a futex wait is invisible to a cooperative
        // scheduler such as clknetsim's shim, which advances time only while every thread
        // sleeps, polls or selects; a worker's end is then noticed within `timeout`.
        std::thread::sleep(timeout);
        let i = self.exits.try_recv().ok()?;
        let t = self.threads.get_mut(i)?.take()?;
        Some(match t.join() {
            Ok(Err(e)) => io::Error::new(e.kind(), format!("worker {i} failed: {e}")),
            Ok(Ok(())) => io::Error::other(format!("worker {i} ended on its own")),
            Err(_) => io::Error::other(format!("worker {i} panicked")),
        })
    }

    /// Runs until `stop` is set or a worker ends. `tick` runs about every 100 ms and may report a
    /// failure elsewhere in the process. On a failure it is logged at once, `stop` is set for
    /// every other thread, and the error is returned so the process exits non-zero and its
    /// supervisor restarts it rather than running on with fewer workers.
    pub fn supervise(mut self, stop: &AtomicBool, mut tick: impl FnMut() -> Option<io::Error>) -> io::Result<()> {
        let failure = loop {
            if stop.load(Ordering::Relaxed) {
                break None;
            }
            if let Some(e) = self.wait_exit(Duration::from_millis(100)).or_else(&mut tick)
                && !stop.load(Ordering::Relaxed)
            {
                break Some(e);
            }
        };
        if let Some(e) = &failure {
            log::error!("{e}: stopping the whole server");
        }
        stop.store(true, Ordering::Relaxed);
        let rest = self.join();
        match failure {
            Some(e) => Err(e),
            None => rest,
        }
    }

    /// Waits for every worker; the first error wins.
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for (i, t) in self.threads.into_iter().enumerate() {
            let Some(t) = t else { continue };
            let r = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other(format!("worker {i} panicked"))));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

/// Fault injection for the tests of the supervision above: debug builds with
/// `GNOMON_FAULT=worker-error` make worker 0 fail 500 ms after start (so the server is up and
/// serving on its other workers first). Release builds never read the variable.
fn injected_fault(worker: usize) -> Option<io::Error> {
    if !cfg!(debug_assertions) || worker != 0 || std::env::var_os("GNOMON_FAULT").is_none_or(|v| v != "worker-error") {
        return None;
    }
    std::thread::sleep(Duration::from_millis(500));
    Some(io::Error::other("fault injected by GNOMON_FAULT=worker-error"))
}

/// Whether a bind failed because the address family is missing from the kernel (socket() gives
/// EAFNOSUPPORT when IPv6 is disabled at boot; bind can give EADDRNOTAVAIL).
fn family_unavailable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL))
}

fn available_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .map(|v| v.into_iter().map(|c| c.id).collect())
        .unwrap_or_default()
}

/// Resolves `auto` by probing the kernel once, with one log line when io_uring is unavailable.
fn choose_backend(io: IoMode) -> io::Result<&'static str> {
    match io {
        IoMode::Mmsg => Ok("mmsg"),
        IoMode::Uring | IoMode::UringSend => uring::probe()
            .map(|()| {
                if io == IoMode::UringSend {
                    "io_uring-send"
                } else {
                    "io_uring"
                }
            })
            .map_err(|uring::Unsupported(why)| io::Error::new(io::ErrorKind::Unsupported, format!("io_uring: {why}"))),
        IoMode::Auto | IoMode::Xdp => Ok(match uring::probe() {
            Ok(()) => "io_uring",
            Err(uring::Unsupported(why)) => {
                log::info!("io_uring unavailable ({why}); using recvmmsg/sendmmsg");
                "mmsg"
            }
        }),
    }
}

/// Binds every worker's sockets (so errors show before anything runs), then starts the workers.
/// `make_handler(worker_index, stats)` builds each worker's handler on the calling thread.
pub fn start<H, F>(opts: &ServeOptions, make_handler: F, stop: Arc<AtomicBool>) -> io::Result<Server>
where
    H: Handler + Send + 'static,
    F: Fn(usize, Arc<WorkerStats>) -> H,
{
    spawn(bind(opts)?, make_handler, stop)
}

/// Every worker's sockets, bound, with no thread started yet: the daemon drops its privileges
/// between [`bind`] and [`spawn`], while the process still has a single thread.
pub struct Bound {
    pub local_addrs: Vec<SocketAddr>,
    per_worker: Vec<Vec<Socket>>,
    cpus: Vec<usize>,
    io: IoMode,
    /// The AF_XDP program and sockets, when `io = "xdp"` could set them up.
    pub xdp: Option<xdp::XdpBound>,
}

/// Binds every worker's sockets in one SO_REUSEPORT group per address.
pub fn bind(opts: &ServeOptions) -> io::Result<Bound> {
    if opts.listen.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no listen address"));
    }
    let cpus = if opts.cpus.is_empty() {
        available_cpus()
    } else {
        opts.cpus.clone()
    };
    let workers = if opts.workers == 0 {
        cpus.len().max(1)
    } else {
        opts.workers
    };

    // Bind the first socket of each address to learn the real port (port 0 in tests), then the
    // other workers join the same reuseport group on that port.
    let mut per_worker: Vec<Vec<Socket>> = (0..workers).map(|_| Vec::new()).collect();
    let mut local_addrs = Vec::new();
    let mut own_inodes: Vec<u64> = Vec::new();
    for &addr in &opts.listen {
        let Some(first) = bind_first(addr, &opts.socket, &mut own_inodes)? else {
            continue;
        };
        let bound = first.local_addr()?.as_socket().unwrap_or(addr);
        local_addrs.push(bound);
        per_worker[0].push(first);
        for sockets in per_worker.iter_mut().skip(1) {
            let s = bind_udp(bound, &opts.socket).map_err(|e| listeners::bind_error(bound, e, &own_inodes))?;
            own_inodes.extend(listeners::socket_inode(s.as_raw_fd()));
            sockets.push(s);
        }
        // Attached after the whole group is bound, so the kernel's socket index i is worker i.
        if let Some(prog) = steering::program(opts.steering, bound.is_ipv6(), workers as u32) {
            let last = per_worker[workers - 1].last().expect("bound above");
            socket::attach_reuseport_cbpf(last, &prog)
                .map_err(|e| io::Error::new(e.kind(), format!("reuseport steering on {bound}: {e}")))?;
        }
    }
    if local_addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "none of the listen addresses can be bound",
        ));
    }

    // After the kernel sockets, which learned the real port; while still privileged.
    let xdp = match (&opts.xdp, opts.io) {
        (Some(o), IoMode::Xdp) => match xdp::setup(o, &local_addrs) {
            Ok(x) => Some(x),
            Err(why) if o.required => {
                return Err(io::Error::other(format!(
                    "{why} (refusing to start: [xdp] required = true)"
                )));
            }
            Err(why) => {
                log::warn!("{why}; serving through the kernel sockets only");
                None
            }
        },
        (None, IoMode::Xdp) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "io = \"xdp\" needs an [xdp] table with the interface",
            ));
        }
        _ => None,
    };

    Ok(Bound {
        local_addrs,
        per_worker,
        cpus,
        io: opts.io,
        xdp,
    })
}

/// How often a port-0 listener is bound again when the kernel's pick was a port already in use.
const AUTOBIND_TRIES: usize = 16;

/// The first socket of `addr`'s reuseport group, checked to be the only server there; `None`
/// when `addr` is a wildcard of an address family the kernel lacks (skipped, with a warning).
fn bind_first(addr: SocketAddr, opts: &SocketOptions, own_inodes: &mut Vec<u64>) -> io::Result<Option<Socket>> {
    let mut tries = 0;
    loop {
        let first = match bind_udp(addr, opts) {
            Ok(s) => s,
            // The default listens on both wildcards; a host without IPv6 still serves IPv4. A
            // specific address of a missing family is a config error and stays one.
            Err(e) if addr.ip().is_unspecified() && family_unavailable(&e) => {
                log::warn!("skipping listen address {addr}: {e} (the kernel lacks this address family)");
                return Ok(None);
            }
            Err(e) => return Err(listeners::bind_error(addr, e, own_inodes)),
        };
        let inode = listeners::socket_inode(first.as_raw_fd());
        own_inodes.extend(inode);
        // With SO_REUSEPORT the kernel lets another socket of our user share the port; the
        // kernel's table shows it. That holds for port 0 too: with SO_REUSEPORT set, the
        // kernel's pick of a free port may be one where another reuseport socket of the same
        // user already listens (seen here: 1861 of 20,000 binds of 127.0.0.1:0 joined a live
        // group), so an automatic port is checked and, if shared, picked again.
        let bound = first.local_addr()?.as_socket().unwrap_or(addr);
        match listeners::check_unshared(bound, own_inodes) {
            Ok(()) => return Ok(Some(first)),
            Err(_) if addr.port() == 0 && tries < AUTOBIND_TRIES => {
                tries += 1;
                own_inodes.retain(|i| Some(*i) != inode);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Starts one thread per worker on sockets from [`bind`]. The backend is chosen here, after any
/// privilege drop, so io_uring is probed with the credentials the workers will have.
pub fn spawn<H, F>(bound: Bound, make_handler: F, stop: Arc<AtomicBool>) -> io::Result<Server>
where
    H: Handler + Send + 'static,
    F: Fn(usize, Arc<WorkerStats>) -> H,
{
    let Bound {
        local_addrs,
        per_worker,
        cpus,
        io,
        xdp,
    } = bound;
    let backend = choose_backend(io)?;
    let mut stats = Vec::new();
    let mut threads = Vec::new();
    let (exit_tx, exits) = mpsc::channel();
    for (i, sockets) in per_worker.into_iter().enumerate() {
        let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
        let st = Arc::new(WorkerStats::new(i, cpu, backend));
        stats.push(st.clone());
        let mut handler = make_handler(i, st);
        let stop = stop.clone();
        let notice = ExitNotice {
            worker: i,
            tx: exit_tx.clone(),
        };
        let t = std::thread::Builder::new()
            .name(format!("gnomon-worker-{i}"))
            .spawn(move || {
                let _notice = notice;
                if let Some(e) = injected_fault(i) {
                    return Err(e);
                }
                if let Some(id) = cpu {
                    core_affinity::set_for_current(core_affinity::CoreId { id });
                }
                if backend.starts_with("io_uring") {
                    match uring::run(&sockets, &mut handler, &stop, backend == "io_uring-send") {
                        Ok(()) => return Ok(()),
                        Err(uring::Unsupported(why)) => {
                            log::warn!("worker {i}: io_uring failed ({why}); using recvmmsg/sendmmsg")
                        }
                    }
                }
                mmsg::run(&sockets, &mut handler, &stop)
            })?;
        threads.push(Some(t));
    }
    let kernel_workers = threads.len();
    let (xdp_counters, xdp_link) = match xdp {
        Some(x) => {
            for (slot, (queue, mut xsk)) in x.sockets.into_iter().enumerate() {
                let i = threads.len();
                // Queue q's interrupts are usually on CPU q (tuning/irq-affinity.sh): its
                // worker beside them.
                let cpu = (!cpus.is_empty()).then(|| cpus[queue as usize % cpus.len()]);
                let st = Arc::new(WorkerStats::new(i, cpu, "xdp"));
                stats.push(st.clone());
                let mut handler = make_handler(i, st);
                let stop = stop.clone();
                let counters = x.counters.clone();
                let notice = ExitNotice {
                    worker: i,
                    tx: exit_tx.clone(),
                };
                let t = std::thread::Builder::new()
                    .name(format!("gnomon-xdp-{queue}"))
                    .spawn(move || {
                        let _notice = notice;
                        if let Some(id) = cpu {
                            core_affinity::set_for_current(core_affinity::CoreId { id });
                        }
                        xdp::run(&mut xsk, slot, &counters, &mut handler, &stop)
                    })?;
                threads.push(Some(t));
            }
            (Some(x.counters), Some(x.link))
        }
        None => (None, None),
    };
    Ok(Server {
        local_addrs,
        stats,
        backend,
        kernel_workers,
        xdp: xdp_counters,
        _xdp_link: xdp_link,
        threads,
        exits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel's pick for port 0 ignores reuseport groups of the same user, so without the
    /// check in [`bind_first`] about one bind in ten here joined one of the held groups below.
    #[test]
    fn an_automatic_port_never_joins_another_reuseport_group() {
        // An address of its own, so the held sockets cannot join other tests' servers.
        let addr: SocketAddr = "127.77.0.1:0".parse().unwrap();
        let opts = ServeOptions {
            listen: vec![addr],
            workers: 1,
            ..Default::default()
        };
        let held: Vec<Socket> = (0..2000)
            .map(|_| socket::bind_udp(addr, &opts.socket).unwrap())
            .collect();
        let held_ports: std::collections::HashSet<u16> = held
            .iter()
            .map(|s| s.local_addr().unwrap().as_socket().unwrap().port())
            .collect();
        for _ in 0..100 {
            let b = bind(&opts).unwrap();
            let port = b.local_addrs[0].port();
            assert!(!held_ports.contains(&port), "port {port} is shared with a held group");
        }
    }
}

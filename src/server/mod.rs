//! The per-core workers: sockets in one SO_REUSEPORT group, an I/O backend per worker, and the
//! [`Handler`] that decides what each datagram gets. The only `unsafe` of the crate lives here.

pub mod echo;
pub mod mmsg;
pub mod ntp;
pub mod socket;
pub mod stats;
pub mod steering;
pub mod uring;

use socket::{SocketOptions, bind_udp};
use socket2::Socket;
use stats::WorkerStats;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
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
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" | "io_uring" => Ok(IoMode::Uring),
            "uring-send" => Ok(IoMode::UringSend),
            "mmsg" => Ok(IoMode::Mmsg),
            _ => Err(format!(
                "unknown io backend `{s}` (expected auto, uring, uring-send or mmsg)"
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
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl Server {
    /// Waits for every worker; the first error wins.
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for t in self.threads {
            let r = t.join().unwrap_or_else(|_| Err(io::Error::other("worker panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
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
        IoMode::Auto => Ok(match uring::probe() {
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
    for &addr in &opts.listen {
        let first = bind_udp(addr, &opts.socket).map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
        let bound = first.local_addr()?.as_socket().unwrap_or(addr);
        local_addrs.push(bound);
        per_worker[0].push(first);
        for sockets in per_worker.iter_mut().skip(1) {
            sockets.push(
                bind_udp(bound, &opts.socket).map_err(|e| io::Error::new(e.kind(), format!("bind {bound}: {e}")))?,
            );
        }
        // Attached after the whole group is bound, so the kernel's socket index i is worker i.
        if let Some(prog) = steering::program(opts.steering, bound.is_ipv6(), workers as u32) {
            let last = per_worker[workers - 1].last().expect("bound above");
            socket::attach_reuseport_cbpf(last, &prog)
                .map_err(|e| io::Error::new(e.kind(), format!("reuseport steering on {bound}: {e}")))?;
        }
    }

    let backend = choose_backend(opts.io)?;
    let mut stats = Vec::new();
    let mut threads = Vec::new();
    for (i, sockets) in per_worker.into_iter().enumerate() {
        let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
        let st = Arc::new(WorkerStats::new(i, cpu, backend));
        stats.push(st.clone());
        let mut handler = make_handler(i, st);
        let stop = stop.clone();
        let t = std::thread::Builder::new()
            .name(format!("gnomon-worker-{i}"))
            .spawn(move || {
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
        threads.push(t);
    }
    Ok(Server {
        local_addrs,
        stats,
        backend,
        threads,
    })
}

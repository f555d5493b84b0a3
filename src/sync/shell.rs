//! The sync thread: the I/O around [`SyncCore`]. One UDP socket for all upstreams (dual-stack
//! when IPv6 is available), random transmit timestamps from `getrandom`, and the clock
//! publisher. DNS (`ToSocketAddrs`, which blocks for as long as the name servers take: 6 s and
//! more when one never answers) runs on a few resolver threads of its own, fed and drained
//! through channels, so no lookup ever delays a poll, a publish or the reaction to a clock step.
//!
//! T1 and T4 are kernel clock readings taken just before the send and just after the receive
//! returns, mapped onto the raw timeline the engine runs on ([`Timeline`]). Kernel receive
//! timestamps would shave the thread wake-up latency (tens of microseconds) off the delay,
//! which matters little for polling servers over a network.
//! The blocking receive wakes as soon as a reply arrives, so T4 is not quantised by the timeout.

use super::adjtimex::LinuxClock;
use super::engine::{LookupRequest, SyncCore};
use super::kernel::{KernelClock, KernelEvent, Timeline};
use super::report::{SyncReport, changes};
use super::{ClockMode, SyncConfig, check_system_mode};
use crate::clock::{ClockPublisher, realtime_ns};
use crate::logging::{Event, flush_suppressed, state_change};
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

/// Longest the thread blocks, so it notices `stop` promptly.
const MAX_WAIT_NS: i64 = 100_000_000;
/// The report is rebuilt at least this often even when nothing happened (for "when").
const REPORT_EVERY_NS: i64 = 1_000_000_000;
/// Lookups at once: a name whose server never answers must not hold up the others, and the
/// number of threads stays small whatever the config holds.
const RESOLVER_THREADS: usize = 4;
/// Addresses kept of one answer; the engine takes what its caps allow.
const MAX_ANSWER_ADDRS: usize = 16;

/// The running sync thread.
pub struct SyncHandle {
    report: Arc<Mutex<SyncReport>>,
    thread: JoinHandle<()>,
}

/// A cloneable reader of the sync thread's report, for the control socket.
#[derive(Clone)]
pub struct SyncReporter(Arc<Mutex<SyncReport>>);

impl SyncReporter {
    /// The latest report (rebuilt by the thread at least once a second).
    pub fn report(&self) -> SyncReport {
        match self.0.lock() {
            Ok(r) => r.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl SyncHandle {
    /// The latest report (rebuilt by the thread at least once a second).
    pub fn report(&self) -> SyncReport {
        self.reporter().report()
    }

    pub fn reporter(&self) -> SyncReporter {
        SyncReporter(self.report.clone())
    }

    /// Whether the thread has ended (it only does on `stop`, or by a panic).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the thread to end (set `stop` first).
    pub fn join(self) -> std::thread::Result<()> {
        self.thread.join()
    }
}

/// Starts the sync thread. It publishes through `publisher` until `stop` is set.
/// Fails at once for mode `system` (see [`check_system_mode`]) or if no socket can be opened.
pub fn spawn(
    config: SyncConfig,
    mut publisher: ClockPublisher,
    precision: i8,
    stop: Arc<AtomicBool>,
) -> io::Result<SyncHandle> {
    check_system_mode(config.mode).map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e))?;
    let socket = open_socket()?;
    let mut kernel = LinuxClock::new()?;
    let system = config.mode == ClockMode::System;
    // Reading the setting needs no privilege; a sandbox that forbids even that only matters
    // when the clock is to be steered.
    let frequency = match kernel.frequency() {
        Ok(f) => f,
        Err(e) if system => {
            return Err(io::Error::new(
                e.kind(),
                format!("clock mode \"system\": adjtimex: {e}"),
            ));
        }
        Err(_) => 0.0,
    };
    let mut timeline = Timeline::new(system, kernel.read(), frequency);
    timeline.makestep = config.makestep.unwrap_or_default();
    let now = timeline.raw_now();
    // Host names are only looked up once the thread runs, on the resolver's threads: the first
    // state goes out now, whatever DNS does.
    let core = SyncCore::new(&config, precision, now);
    let resolver = Resolver::start(core.names_to_look_up())?;
    let nts = NtsClients::start(config.upstreams.iter().filter(|u| u.nts.is_some()).count())?;
    publisher.publish(timeline.snapshot(&core.state()));
    let report = Arc::new(Mutex::new(make_report(&core, &timeline, now)));
    let shared = report.clone();
    let thread = std::thread::Builder::new().name("gnomon-sync".into()).spawn(move || {
        run(
            core,
            timeline,
            kernel,
            Net { socket, resolver, nts },
            publisher,
            shared,
            &stop,
        )
    })?;
    Ok(SyncHandle { report, thread })
}

fn make_report(core: &SyncCore, timeline: &Timeline, now: i64) -> SyncReport {
    let mut r = core.report(now);
    timeline.fill_report(&mut r.system, &core.state(), now);
    r
}

/// A dual-stack socket if the host has IPv6, else IPv4 only.
fn open_socket() -> io::Result<UdpSocket> {
    let v6 = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
        Ok(s)
    });
    match v6 {
        Ok(s) => Ok(s.into()),
        Err(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)),
    }
}

/// One blocking lookup: the addresses of `host` in the resolver's order, without repeats.
fn lookup(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for a in (host, port).to_socket_addrs().map_err(|e| e.to_string())? {
        if !addrs.contains(&a) {
            addrs.push(a);
        }
        if addrs.len() == MAX_ANSWER_ADDRS {
            break;
        }
    }
    if addrs.is_empty() {
        return Err("no address".to_string());
    }
    Ok(addrs)
}

/// What the sync thread talks to: the upstreams' socket, the resolver and the NTS-KE thread.
struct Net {
    socket: UdpSocket,
    resolver: Resolver,
    nts: NtsClients,
}

/// A whole key exchange ends within this; a silent KE server delays only the key exchanges
/// queued behind it, never a poll.
const KE_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry after a failed key exchange; doubled up to [`KE_BACKOFF_MAX_NS`].
const KE_BACKOFF_NS: i64 = 8_000_000_000;
const KE_BACKOFF_MAX_NS: i64 = 1_024_000_000_000;

struct KeJob {
    addr: SocketAddr,
    ke: SocketAddr,
    server_name: String,
    ca: std::path::PathBuf,
}

type KeAnswer = (SocketAddr, Result<crate::nts::ke_client::KeSession, String>);

/// One NTS source's session: its cookies and keys, the request in flight, and KE's state.
struct NtsPeer {
    addr: SocketAddr,
    session: Option<crate::nts::client::Session>,
    pending: Option<crate::nts::client::Pending>,
    ke_in_flight: bool,
    next_ke_ns: i64,
    backoff_ns: i64,
    error: Option<String>,
    /// Replies that did not authenticate (spoofed, or for an older request).
    unauthenticated: u64,
}

/// NTS for the sources that ask for it (`nts = true`). Key exchanges run on a thread of their
/// own, fed and drained through channels like the resolver, so TLS never stalls a poll.
struct NtsClients {
    peers: Vec<NtsPeer>,
    jobs: mpsc::SyncSender<KeJob>,
    answers: mpsc::Receiver<KeAnswer>,
}

impl NtsClients {
    fn start(sources: usize) -> io::Result<NtsClients> {
        let (jobs, job_rx) = mpsc::sync_channel::<KeJob>(sources.max(1));
        let (answer_tx, answers) = mpsc::channel();
        if sources > 0 {
            std::thread::Builder::new()
                .name("gnomon-nts-ke".into())
                .spawn(move || {
                    while let Ok(job) = job_rx.recv() {
                        let result = crate::nts::ke_client::roots(&job.ca)
                            .and_then(|roots| {
                                crate::nts::ke_client::key_exchange(job.ke, &job.server_name, roots, KE_TIMEOUT)
                            })
                            .map_err(|e| format!("NTS-KE with {} ({}): {e}", job.server_name, job.ke));
                        if answer_tx.send((job.addr, result)).is_err() {
                            return;
                        }
                    }
                })?;
        }
        Ok(NtsClients {
            peers: Vec::new(),
            jobs,
            answers,
        })
    }

    fn peer(&mut self, addr: SocketAddr) -> &mut NtsPeer {
        let i = match self.peers.iter().position(|p| p.addr == addr) {
            Some(i) => i,
            None => {
                self.peers.push(NtsPeer {
                    addr,
                    session: None,
                    pending: None,
                    ke_in_flight: false,
                    next_ke_ns: i64::MIN,
                    backoff_ns: KE_BACKOFF_NS,
                    error: None,
                    unauthenticated: 0,
                });
                self.peers.len() - 1
            }
        };
        &mut self.peers[i]
    }

    /// The request to send to NTS source `addr` for the engine's `req`, or `None` (the poll is
    /// lost) while it has no cookie, in which case a key exchange is started if none is due.
    fn request(
        &mut self,
        addr: SocketAddr,
        name: &str,
        nts: &super::NtsUpstream,
        req: &[u8; crate::proto::HEADER_LEN],
        now: i64,
    ) -> Option<Vec<u8>> {
        let jobs = self.jobs.clone();
        let p = self.peer(addr);
        if let Some(s) = p.session.as_mut()
            && let Some((bytes, pending)) =
                s.request(req, crate::nts::ke_client::random(), crate::nts::ke_client::random())
        {
            p.pending = Some(pending);
            return Some(bytes);
        }
        if !p.ke_in_flight && now >= p.next_ke_ns {
            let job = KeJob {
                addr,
                ke: SocketAddr::new(addr.ip(), nts.ke_port),
                server_name: name.to_string(),
                ca: nts
                    .ca
                    .clone()
                    .unwrap_or_else(|| crate::nts::ke_client::SYSTEM_ROOTS.into()),
            };
            p.ke_in_flight = jobs.try_send(job).is_ok();
        }
        None
    }

    /// Applies finished key exchanges; returns whether there was one.
    fn drain(&mut self, now: i64) -> bool {
        let mut any = false;
        while let Ok((addr, result)) = self.answers.try_recv() {
            any = true;
            let p = self.peer(addr);
            p.ke_in_flight = false;
            match result {
                Ok(ke) => {
                    if ke.ntp_port.is_some_and(|port| port != addr.port()) || ke.ntp_server.is_some() {
                        state_change(Event::warn(
                            "nts",
                            &addr.to_string(),
                            format!(
                                "NTS-KE for {addr} names NTP server {:?} port {:?}; gnomon keeps polling {addr} (set address and port to follow it)",
                                ke.ntp_server, ke.ntp_port
                            ),
                        ));
                    }
                    state_change(Event::info(
                        "nts",
                        &addr.to_string(),
                        format!("NTS-KE for {addr}: {} cookies", ke.cookies.len()),
                    ));
                    p.session = Some(crate::nts::client::Session::new(ke));
                    p.error = None;
                    p.backoff_ns = KE_BACKOFF_NS;
                }
                Err(e) => {
                    if p.error.as_deref() != Some(e.as_str()) {
                        state_change(Event::warn("nts", &addr.to_string(), e.clone()));
                    }
                    p.error = Some(e);
                    p.next_ke_ns = now + p.backoff_ns;
                    p.backoff_ns = (p.backoff_ns * 2).min(KE_BACKOFF_MAX_NS);
                }
            }
        }
        any
    }

    /// Checks a datagram from NTS source `from`: the NTP header to hand to the engine when it
    /// authenticates, `None` otherwise (an NTS NAK ends the session: KE runs again).
    fn reply<'a>(&mut self, from: SocketAddr, reply: &'a [u8]) -> Option<&'a [u8]> {
        use crate::nts::client::ReplyError;
        let p = self.peer(from);
        let (Some(s), Some(pending)) = (p.session.as_mut(), p.pending) else {
            p.unauthenticated += 1;
            return None;
        };
        match s.reply(reply, &pending) {
            Ok(_) => {
                p.pending = None;
                Some(&reply[..crate::proto::HEADER_LEN])
            }
            Err(ReplyError::Nak) => {
                state_change(Event::warn(
                    "nts",
                    &from.to_string(),
                    format!("NTS NAK from {from}: cookies refused, running NTS-KE again"),
                ));
                p.pending = None;
                p.session = None;
                p.next_ke_ns = i64::MIN;
                None
            }
            Err(_) => {
                p.unauthenticated += 1;
                None
            }
        }
    }

    /// What each NTS source's session is doing, for `gnomon sources` and `status`.
    fn fill(&self, core: &SyncCore, r: &mut SyncReport) {
        for s in &mut r.sources {
            let Some(addr) = s.addr else { continue };
            if core.nts_of(addr).is_none() {
                continue;
            }
            let p = self.peers.iter().find(|p| p.addr == addr);
            let cookies = p.and_then(|p| p.session.as_ref()).map(|s| s.cookies());
            let bad = p.map_or(0, |p| p.unauthenticated);
            s.nts = Some(match (cookies, p.and_then(|p| p.error.as_deref())) {
                (Some(c), _) if s.reach != 0 => {
                    format!("authenticated, {c} cookies, {bad} unauthenticated replies dropped")
                }
                (Some(c), _) => format!("NTS-KE done ({c} cookies), no authenticated reply yet"),
                (None, Some(e)) => format!("no cookies: {e}"),
                (None, None) => "NTS-KE in progress".to_string(),
            });
        }
    }
}

type Answer = (usize, Result<Vec<SocketAddr>, String>);

/// The resolver threads and the two channels to them. The engine hands out at most one lookup
/// per configured name at a time, so a queue as long as the config bounds what is pending.
struct Resolver {
    jobs: mpsc::SyncSender<LookupRequest>,
    answers: mpsc::Receiver<Answer>,
    /// The last failure logged per name id: a name that keeps failing the same way is logged
    /// once, not at every retry.
    logged: Vec<(usize, String)>,
}

impl Resolver {
    /// Threads for up to `names` lookups at once (at most [`RESOLVER_THREADS`]); they end when
    /// the sync thread drops its side, or after the lookup they are in, if one is.
    fn start(names: usize) -> io::Result<Resolver> {
        let (jobs, job_rx) = mpsc::sync_channel::<LookupRequest>(names.max(1));
        let (answer_tx, answers) = mpsc::channel();
        let job_rx = Arc::new(Mutex::new(job_rx));
        for _ in 0..names.min(RESOLVER_THREADS) {
            let job_rx = job_rx.clone();
            let answer_tx = answer_tx.clone();
            std::thread::Builder::new().name("gnomon-dns".into()).spawn(move || {
                loop {
                    // The lock is held only while waiting for a job, never during a lookup.
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    let Ok(job) = job else { return };
                    let result = lookup(&job.host, job.port);
                    if answer_tx.send((job.id, result)).is_err() {
                        return;
                    }
                }
            })?;
        }
        Ok(Resolver {
            jobs,
            answers,
            logged: Vec::new(),
        })
    }

    /// Hands lookups to the threads, without waiting; one that cannot be queued is answered
    /// with an error at once, so the engine retries it later.
    fn submit(&self, core: &mut SyncCore, lookups: &mut Vec<LookupRequest>, now: i64) {
        for job in lookups.drain(..) {
            let id = job.id;
            if let Err(e) = self.jobs.try_send(job) {
                let why = match e {
                    mpsc::TrySendError::Full(_) => "resolver queue full",
                    mpsc::TrySendError::Disconnected(_) => "resolver threads not running",
                };
                core.resolved(id, Err(why.to_string()), now);
            }
        }
    }

    /// Feeds every answer that has arrived to the engine; returns whether there was one.
    fn drain(&mut self, core: &mut SyncCore, now: i64) -> bool {
        let mut any = false;
        while let Ok((id, result)) = self.answers.try_recv() {
            let last = self.logged.iter().position(|l| l.0 == id);
            match (&result, last) {
                (Err(e), Some(i)) if self.logged[i].1 == *e => {}
                (Err(e), _) => {
                    let name = core.name_of(id);
                    state_change(Event::warn(
                        "dns",
                        name,
                        format!("DNS lookup of {name} failed: {e} (retried every minute)"),
                    ));
                    self.logged.retain(|l| l.0 != id);
                    self.logged.push((id, e.clone()));
                }
                (Ok(_), Some(i)) => {
                    let name = core.name_of(id);
                    state_change(Event::info(
                        "dns",
                        name,
                        format!("DNS lookup of {name} succeeded again"),
                    ));
                    self.logged.swap_remove(i);
                }
                (Ok(_), None) => {}
            }
            core.resolved(id, result, now);
            any = true;
        }
        any
    }
}

/// IPv4 addresses go out of a dual-stack socket as v4-mapped IPv6.
fn wire_addr(socket_is_v6: bool, a: SocketAddr) -> SocketAddr {
    match (socket_is_v6, a) {
        (true, SocketAddr::V4(v4)) => SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0)),
        _ => a,
    }
}

fn source_addr(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => a,
        },
        a => a,
    }
}

/// Fresh random bits for transmit timestamps. getrandom does not fail on Linux after boot;
/// should it, a splitmix64 over the clock still gives values an off-path spoofer cannot guess
/// exactly.
fn random_u64(fallback: &mut u64) -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        *fallback = fallback.wrapping_add(0x9e37_79b9_7f4a_7c15) ^ realtime_ns() as u64;
        let mut z = *fallback;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}

/// The engine runs on the raw timeline (see [`Timeline`]); every kernel clock reading is mapped
/// onto it, and every state is mapped back to a correction of the kernel clock for the workers.
fn run(
    mut core: SyncCore,
    mut timeline: Timeline,
    mut kernel: LinuxClock,
    net: Net,
    mut publisher: ClockPublisher,
    report: Arc<Mutex<SyncReport>>,
    stop: &AtomicBool,
) {
    let Net {
        socket,
        mut resolver,
        mut nts,
    } = net;
    let is_v6 = socket.local_addr().is_ok_and(|a| a.is_ipv6());
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let mut fallback = 0u64;
    let mut lookups = Vec::new();
    let mut last_report = 0i64;
    let mut logged = EventLog::default();
    // What the log last saw: every difference to the next report is a state change.
    let mut last = match report.lock() {
        Ok(g) => g.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    while !stop.load(Ordering::Relaxed) {
        let (now, stepped) = timeline.observe(kernel.read());
        // The kernel's own leap second (mode system): the engine moves with it before anything
        // is steered or published.
        if timeline.take_kernel_leap() {
            core.kernel_leap(now);
        }
        // A new state, a step by someone else, or a change of the kernel's steering all move
        // the correction the workers apply. After someone else's step or frequency change, the
        // kernel is put back on course at once (system mode).
        let mut republish = stepped;
        if stepped {
            timeline.steer(&mut kernel, &core.state(), now);
        }
        if let Ok(f) = kernel.frequency()
            && timeline.check_frequency(f)
        {
            republish |= timeline.steer(&mut kernel, &core.state(), now);
        }
        if let Some(s) = core.tick(now) {
            timeline.steer(&mut kernel, &s, now);
            republish = true;
        } else if timeline.deadline().is_some_and(|d| d <= now) {
            republish |= timeline.steer(&mut kernel, &core.state(), now);
        }
        if republish {
            publisher.publish(timeline.snapshot(&core.state()));
        }
        logged.note(&timeline, now);
        let mut changed = republish;
        // Answers first, so that new sources are polled at once.
        changed |= resolver.drain(&mut core, now);
        changed |= nts.drain(now);
        out.clear();
        core.poll(now, &mut || random_u64(&mut fallback), &mut out);
        for (addr, req) in &out {
            // A failed send is a lost poll: the reachability register records it. So is an NTS
            // source's poll while it waits for cookies.
            match core.nts_of(*addr) {
                Some((name, up)) => {
                    if let Some(bytes) = nts.request(*addr, name, up, req, now) {
                        let _ = socket.send_to(&bytes, wire_addr(is_v6, *addr));
                    }
                }
                None => {
                    let _ = socket.send_to(req, wire_addr(is_v6, *addr));
                }
            }
            changed = true;
        }
        core.lookups(now, &mut lookups);
        changed |= !lookups.is_empty();
        resolver.submit(&mut core, &mut lookups, now);
        if changed || now - last_report >= REPORT_EVERY_NS {
            last_report = now;
            let mut r = make_report(&core, &timeline, now);
            nts.fill(&core, &mut r);
            for e in changes(&last, &r) {
                state_change(e);
            }
            flush_suppressed();
            last = r.clone();
            match report.lock() {
                Ok(mut g) => *g = r,
                Err(poisoned) => *poisoned.into_inner() = r,
            }
        }
        let wait = [core.next_deadline(), timeline.deadline()]
            .into_iter()
            .flatten()
            .min()
            .map_or(MAX_WAIT_NS, |d| d - timeline.raw_of_kernel(realtime_ns()))
            .clamp(1_000_000, MAX_WAIT_NS);
        let _ = socket.set_read_timeout(Some(Duration::from_nanos(wait as u64)));
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            // Through `observe`, so that a step since the top of the loop is neither in T4 nor
            // left in served time.
            let (t4, stepped) = timeline.observe(kernel.read());
            if timeline.take_kernel_leap() {
                core.kernel_leap(t4);
            }
            let from = source_addr(from);
            // An NTS source's reply counts only once it authenticates.
            let datagram = match core.nts_of(from) {
                Some(_) => nts.reply(from, &buf[..n]),
                None => Some(&buf[..n]),
            };
            let reply = datagram.and_then(|d| core.handle_reply(from, d, t4));
            if let Some(s) = reply.as_ref().or(stepped.then_some(&core.state())) {
                timeline.steer(&mut kernel, s, t4);
            }
            if stepped || reply.is_some() {
                publisher.publish(timeline.snapshot(&core.state()));
            }
            last_report = 0;
        }
    }
    // Mode system: leave the kernel running at the estimated rate, not mid-slew.
    if let Err(e) = timeline.release(&mut kernel, core.frequency()) {
        log::warn!("could not leave the kernel clock at the estimated frequency: {e}");
    }
}

/// Logs what happens to the kernel clock: each new kind of event at once, a repeat of the same
/// kind (another daemon fighting over the frequency, say) at most once a minute.
#[derive(Default)]
struct EventLog {
    last: Option<(std::mem::Discriminant<KernelEvent>, i64)>,
    seen: Option<KernelEvent>,
}

impl EventLog {
    fn note(&mut self, timeline: &Timeline, now: i64) {
        let Some(e) = timeline.last_event else { return };
        if self.seen == Some(e) {
            return;
        }
        self.seen = Some(e);
        let kind = std::mem::discriminant(&e);
        if self.last.is_some_and(|(k, at)| k == kind && now - at < 60_000_000_000) {
            return;
        }
        self.last = Some((kind, now));
        match e {
            KernelEvent::Leap { .. } => log::info!("{e}"),
            _ => log::warn!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::UpstreamConfig;

    #[test]
    fn mapped_addresses_round_trip() {
        let a: SocketAddr = "127.0.0.1:123".parse().unwrap();
        let w = wire_addr(true, a);
        assert!(w.is_ipv6());
        assert_eq!(source_addr(w), a);
        assert_eq!(wire_addr(false, a), a);
        let v6: SocketAddr = "[::1]:123".parse().unwrap();
        assert_eq!(source_addr(v6), v6);
    }

    #[test]
    fn lookups_answer_through_the_channel_and_failures_are_reported() {
        assert_eq!(
            lookup("localhost", 123).unwrap()[0].port(),
            123,
            "a name from /etc/hosts"
        );
        let mut up = UpstreamConfig::new("bad\0name");
        up.pool = true;
        let config = SyncConfig {
            upstreams: vec![up],
            ..SyncConfig::default()
        };
        let mut core = SyncCore::new(&config, -20, 0);
        let mut resolver = Resolver::start(1).unwrap();
        let mut jobs = Vec::new();
        core.lookups(0, &mut jobs);
        assert_eq!(jobs.len(), 1);
        resolver.submit(&mut core, &mut jobs, 0);
        let why = |core: &SyncCore| core.report(0).sources[0].why.clone().unwrap();
        assert!(why(&core).starts_with("DNS lookup in progress"), "{}", why(&core));
        core.lookups(0, &mut jobs);
        assert!(jobs.is_empty(), "one lookup of a name at a time");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !resolver.drain(&mut core, 0) {
            assert!(
                std::time::Instant::now() < deadline,
                "no answer from the resolver thread"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(why(&core).starts_with("DNS failure"), "{}", why(&core));
    }
}

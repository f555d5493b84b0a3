//! One run: the sockets, a paced sender thread (fixed rate, as fast as possible, or a ramp of
//! steps), a receiver thread that validates every reply, and the report they add up to.
//! Every run is bounded by a duration and a packet budget and ends by itself.

use crate::net::{GenSocket, Poller, RecvBatch, SendBatch, tighten_timer_slack};
use crate::population::{MAX_CLIENTS, Pacer, Picker, client_addr};
use crate::report::{Percentiles, RampResult, Report, StepReport, StreamReport, new_rtt_histogram};
use crate::snmp::{SnmpCheck, read_udp};
use crate::tracker::{MAX_SEQ, MAX_STEPS, MAX_STREAMS, Sent, Tracker};
use crate::validate::{
    Invalid, Kiss, ReplyKind, SeqCodec, Verdict, check_echo, check_server_reply, claimed_seq, fill_request,
    request_template,
};
use crate::xdp::XdpPath;
use gnomon::clock::realtime_ns;
use gnomon::proto::{HEADER_LEN, NtpDuration, NtpTimestamp};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How the offered load evolves.
#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    /// Open loop at this many requests per second from the population.
    Fixed {
        rate: f64,
    },
    /// As fast as the generator can send.
    Max,
    Ramp(RampPlan),
}

/// Step the population's rate up until loss passes `max_loss`, then bisect `refine` times
/// between the best passing and the lowest failing rate. A failing step is measured again up to
/// `retries` times and fails only if every attempt does: one burst of loss (a host hiccup, a
/// timer) then does not end a ramp whose rate the server holds.
#[derive(Clone, Debug, PartialEq)]
pub struct RampPlan {
    pub start: f64,
    /// Next rate = rate * factor, unless `add` is set (then rate + add).
    pub factor: f64,
    pub add: Option<f64>,
    pub step_duration: Duration,
    /// Fraction, e.g. 0.01 for 1 %.
    pub max_loss: f64,
    pub refine: u32,
    pub retries: u32,
}

/// A named client sending at its own rate, on top of the population.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Abuser {
    pub addr: Ipv4Addr,
    pub rate: f64,
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub target: SocketAddrV4,
    pub allow_remote: bool,
    pub shape: Shape,
    /// Upper bound on the whole run's sending time (all ramp steps together).
    pub duration: Duration,
    /// Upper bound on requests sent.
    pub max_packets: u64,
    pub clients: u32,
    pub zipf: Option<f64>,
    pub abusers: Vec<Abuser>,
    /// Number of sockets, i.e. distinct source ports; batches rotate over them.
    pub ports: usize,
    /// Requests per sendmmsg.
    pub batch: usize,
    pub kind: ReplyKind,
    pub version: u8,
    pub time_bound: Duration,
    /// Wait for late replies after sending stops (and between ramp steps).
    pub drain: Duration,
    pub cpu: Option<usize>,
    pub progress: bool,
    pub snmp_check: bool,
    /// log2 of the number of requests remembered for matching.
    pub ring_bits: u32,
    pub socket_buffer: usize,
    pub seed: u64,
    /// `--nts`: authenticated requests, with keys and cookies from key exchanges made first.
    pub nts: Option<crate::nts::NtsPlan>,
    /// `--xdp IFACE`: send and receive through AF_XDP on this interface (see `xdp.rs`).
    pub xdp: Option<String>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            target: SocketAddrV4::new(Ipv4Addr::LOCALHOST, 123),
            allow_remote: false,
            shape: Shape::Fixed { rate: 1000.0 },
            duration: Duration::from_secs(10),
            max_packets: 10_000_000,
            clients: 1000,
            zipf: None,
            abusers: Vec::new(),
            ports: 4,
            batch: 32,
            kind: ReplyKind::Ntp,
            version: 4,
            time_bound: Duration::from_secs(1),
            drain: Duration::from_millis(200),
            cpu: None,
            progress: false,
            snmp_check: false,
            ring_bits: 21,
            socket_buffer: 4 << 20,
            seed: 0x9e37_79b9_7f4a_7c15,
            nts: None,
            xdp: None,
        }
    }
}

#[derive(Debug)]
pub enum RunError {
    /// The target is outside 127.0.0.0/8 and `allow_remote` is off.
    RemoteTarget(SocketAddrV4),
    Config(&'static str),
    Io(io::Error),
    /// `--nts`: a key exchange failed before the run.
    Nts(String),
    /// `--xdp`: the AF_XDP path could not be opened.
    Xdp(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::RemoteTarget(a) => write!(f, "{a} is not a loopback address; pass --allow-remote to load it"),
            RunError::Config(m) => write!(f, "{m}"),
            RunError::Io(e) => write!(f, "{e}"),
            RunError::Nts(m) | RunError::Xdp(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for RunError {}

impl From<io::Error> for RunError {
    fn from(e: io::Error) -> Self {
        RunError::Io(e)
    }
}

impl RunConfig {
    pub fn check(&self) -> Result<(), RunError> {
        if !self.target.ip().is_loopback() && !self.allow_remote {
            return Err(RunError::RemoteTarget(self.target));
        }
        if self.clients == 0 || self.clients > MAX_CLIENTS {
            return Err(RunError::Config(
                "--clients must be 1..=8323070 (127.1.0.0 .. 127.255.255.254)",
            ));
        }
        if self.abusers.len() >= MAX_STREAMS {
            return Err(RunError::Config("too many abusers"));
        }
        if self.target.ip().is_loopback() && self.abusers.iter().any(|a| !a.addr.is_loopback()) {
            return Err(RunError::Config("abuser addresses must be in 127.0.0.0/8"));
        }
        if self.abusers.iter().any(|a| !(a.rate > 0.0 && a.rate.is_finite())) {
            return Err(RunError::Config("abuser rates must be positive"));
        }
        if !(1..=1024).contains(&self.batch) || !(1..=1024).contains(&self.ports) {
            return Err(RunError::Config("--batch and --ports must be 1..=1024"));
        }
        if !(1..=4).contains(&self.version) {
            return Err(RunError::Config("--version must be 1..=4"));
        }
        if self.max_packets == 0 || self.max_packets > MAX_SEQ || self.duration.is_zero() {
            return Err(RunError::Config("--duration and --max-packets must be > 0"));
        }
        if self.nts.is_some() && self.kind == ReplyKind::Echo {
            return Err(RunError::Config("--nts and --echo exclude each other"));
        }
        if !(10..=28).contains(&self.ring_bits) {
            return Err(RunError::Config("ring_bits must be 10..=28"));
        }
        match &self.shape {
            Shape::Fixed { rate } if !(*rate >= 0.0 && rate.is_finite()) => {
                Err(RunError::Config("--rate must be a non-negative number"))
            }
            Shape::Ramp(r)
                if !(r.start > 0.0 && r.max_loss >= 0.0 && r.step_duration > Duration::ZERO)
                    || (r.add.is_none() && r.factor <= 1.0)
                    || r.add.is_some_and(|a| a <= 0.0) =>
            {
                Err(RunError::Config(
                    "ramp needs start > 0, step duration > 0 and a factor > 1 or a step > 0",
                ))
            }
            _ => Ok(()),
        }
    }

    /// Whether each packet names its source with IP_PKTINFO. Only on loopback (nothing else
    /// routes 127/8 back to us), and not for a single client: then the kernel's choice
    /// (127.0.0.1) saves the control message.
    pub fn claims_sources(&self) -> bool {
        self.target.ip().is_loopback() && (self.clients > 1 || !self.abusers.is_empty())
    }

    fn abuser_rate(&self) -> f64 {
        self.abusers.iter().map(|a| a.rate).sum()
    }
}

/// Counters the two threads share: the sender reads per-step replies to steer a ramp, the
/// progress bar reads the totals.
struct Shared {
    stop: AtomicBool,
    step_replies: Box<[AtomicU64]>,
    sent: AtomicU64,
    replies: AtomicU64,
}

fn pin(cpu: Option<usize>) {
    if let Some(id) = cpu
        && !core_affinity::set_for_current(core_affinity::CoreId { id })
    {
        eprintln!("gnomon-load: could not pin to CPU {id}");
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

/// What the receiver tallies for one ramp step.
struct Tally {
    replies: u64,
    good: u64,
    kiss: [u64; Kiss::COUNT],
    invalid: [u64; Invalid::COUNT],
    leap: [u64; 4],
    stratum: [u64; 17],
    rtt: Histogram<u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            replies: 0,
            good: 0,
            kiss: [0; Kiss::COUNT],
            invalid: [0; Invalid::COUNT],
            leap: [0; 4],
            stratum: [0; 17],
            rtt: new_rtt_histogram(),
        }
    }

    fn add(&mut self, o: &Tally) {
        self.replies += o.replies;
        self.good += o.good;
        let sum = |a: &mut [u64], b: &[u64]| a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        sum(&mut self.kiss, &o.kiss);
        sum(&mut self.invalid, &o.invalid);
        sum(&mut self.leap, &o.leap);
        sum(&mut self.stratum, &o.stratum);
        self.rtt.add(&o.rtt).expect("same bounds");
    }
}

struct RxOut {
    steps: Vec<Tally>,
    /// Per stream: replies and KoDs.
    streams: Vec<(u64, u64)>,
    /// Invalid datagrams that cannot be tied to a request (and so to a step).
    loose: [u64; Invalid::COUNT],
    /// `--nts`: where replies are decrypted.
    scratch: Vec<u8>,
}

struct Receiver<'x> {
    target: SocketAddrV4,
    kind: ReplyKind,
    codec: SeqCodec,
    template: [u8; HEADER_LEN],
    version: u8,
    time_bound: NtpDuration,
    start: Instant,
    tracker: Arc<Tracker>,
    shared: Arc<Shared>,
    nts: Option<Arc<crate::nts::NtsKeys>>,
    xdp: Option<&'x XdpPath>,
}

impl Receiver<'_> {
    fn run(&self, fds: &[RawFd], streams: usize) -> io::Result<RxOut> {
        let mut out = RxOut {
            steps: vec![Tally::new()],
            streams: vec![(0, 0); streams],
            loose: [0; Invalid::COUNT],
            scratch: Vec::with_capacity(crate::net::RECV_BUF_LEN),
        };
        if let Some(xdp) = self.xdp {
            return self.run_xdp(xdp, out);
        }
        let mut poller = Poller::new(fds);
        let mut batch = RecvBatch::new(64);
        loop {
            let stopping = self.shared.stop.load(Ordering::Acquire);
            poller.wait(if stopping { 0 } else { 10 })?;
            let mut got = 0;
            for (i, &fd) in fds.iter().enumerate() {
                if !poller.readable(i) {
                    continue;
                }
                loop {
                    let n = batch.recv(fd)?;
                    if n == 0 {
                        break;
                    }
                    got += n;
                    // One clock read per batch: RTTs include our own receive batching.
                    let mono_ns = self.start.elapsed().as_nanos() as u64;
                    let now = NtpTimestamp::from_unix_nanos(realtime_ns() as i128);
                    for j in 0..n {
                        let (bytes, from) = batch.get(j);
                        self.handle(&mut out, bytes, from, batch.truncated(j), mono_ns, now);
                    }
                    if n < 64 {
                        break;
                    }
                }
            }
            if stopping && got == 0 {
                return Ok(out);
            }
        }
    }

    /// As `run`, from the AF_XDP socket's RX ring.
    fn run_xdp(&self, xdp: &XdpPath, mut out: RxOut) -> io::Result<RxOut> {
        let mut poller = Poller::new(&[xdp.fd()]);
        let mut scratch = crate::xdp::RecvScratch::default();
        loop {
            let stopping = self.shared.stop.load(Ordering::Acquire);
            poller.wait(if stopping { 0 } else { 10 })?;
            let mut got = 0;
            loop {
                let mono_ns = self.start.elapsed().as_nanos() as u64;
                let now = NtpTimestamp::from_unix_nanos(realtime_ns() as i128);
                let n = xdp.recv(&mut scratch, |bytes, from| {
                    self.handle(&mut out, bytes, from, false, mono_ns, now)
                });
                got += n;
                if n < gnomon::xdp::xsk::BATCH {
                    break;
                }
            }
            if stopping && got == 0 {
                return Ok(out);
            }
        }
    }

    #[inline]
    fn handle(
        &self,
        out: &mut RxOut,
        bytes: &[u8],
        from: SocketAddrV4,
        truncated: bool,
        mono_ns: u64,
        now: NtpTimestamp,
    ) {
        let matched = (|| {
            if truncated {
                return Err(Invalid::BadLength);
            }
            if from != self.target {
                return Err(Invalid::WrongSource);
            }
            let seq = claimed_seq(bytes, self.kind, &self.codec)?;
            Ok((seq, self.tracker.answer(seq)?))
        })();
        let (seq, sent) = match matched {
            Ok(m) => m,
            Err(e) => {
                out.loose[e as usize] += 1;
                return;
            }
        };
        let step = sent.step as usize;
        while out.steps.len() <= step {
            out.steps.push(Tally::new());
        }
        let t = &mut out.steps[step];
        t.replies += 1;
        self.shared.step_replies[step].store(t.replies, Ordering::Relaxed);
        self.shared.replies.fetch_add(1, Ordering::Relaxed);
        t.rtt.saturating_record(mono_ns.saturating_sub(sent.sent_ns).max(1));
        let stream = &mut out.streams[sent.stream as usize];
        stream.0 += 1;
        // A NAK is a kiss (counted as NTSN below); anything else that does not verify is no
        // answer of the server's to this request.
        if let Some(nts) = &self.nts
            && let Err(e) = nts.verify(bytes, seq, &mut out.scratch)
            && e != gnomon::nts::client::ReplyError::Nak
        {
            t.invalid[Invalid::Unauthenticated as usize] += 1;
            return;
        }
        let verdict = match self.kind {
            ReplyKind::Ntp => check_server_reply(bytes, self.version, now, self.time_bound),
            ReplyKind::Echo => check_echo(bytes, &self.template, &self.codec, seq).map(|()| Verdict::Echo),
        };
        match verdict {
            Ok(Verdict::Time { leap, stratum }) => {
                t.good += 1;
                t.leap[leap as usize] += 1;
                t.stratum[stratum.min(16) as usize] += 1;
            }
            Ok(Verdict::Echo) => t.good += 1,
            Ok(Verdict::Kiss(k)) => {
                t.kiss[k as usize] += 1;
                stream.1 += 1;
            }
            Err(e) => t.invalid[e as usize] += 1,
        }
    }
}

/// What the sender did in one step.
struct StepSent {
    offered: Option<f64>,
    sent: u64,
    errors: u64,
    skipped: u64,
    duration: Duration,
    complete: bool,
}

struct Sender<'a> {
    cfg: &'a RunConfig,
    fds: Vec<RawFd>,
    batch: SendBatch,
    stream_of: Vec<u16>,
    template: [u8; HEADER_LEN],
    codec: SeqCodec,
    tracker: Arc<Tracker>,
    shared: Arc<Shared>,
    start: Instant,
    deadline: Instant,
    nts: Option<Arc<crate::nts::NtsKeys>>,
    /// `--nts`: where each request is built.
    scratch: Vec<u8>,
    picker: Picker,
    seq: u64,
    stream_sent: Vec<u64>,
    rr: usize,
    xdp: Option<&'a XdpPath>,
}

impl Sender<'_> {
    fn out_of_budget(&self) -> bool {
        self.seq >= self.cfg.max_packets || Instant::now() >= self.deadline
    }

    fn step(&mut self, step: u16, pop_rate: Option<f64>, want: Duration) -> io::Result<StepSent> {
        let cap = self.batch.capacity();
        let t0 = Instant::now();
        let end = (t0 + want).min(self.deadline);
        let mut complete = t0 + want <= self.deadline;
        let offered = pop_rate.map(|r| r + self.cfg.abuser_rate());
        // Send when a full batch is due, or at least this often when the rate is low.
        let tick_ns = offered.map_or(0, |r| {
            ((cap as f64 / r.max(1e-9)) * 1e9).clamp(20_000.0, 1_000_000.0) as u64
        });
        let backlog = 8 * cap as u64;
        let mut pacers: Vec<Pacer> = std::iter::once(Pacer::new(pop_rate, backlog))
            .chain(self.cfg.abusers.iter().map(|a| Pacer::new(Some(a.rate), backlog)))
            .collect();
        let mut dues = vec![0u64; pacers.len()];
        let (mut sent, mut errors) = (0u64, 0u64);
        let mut last_send_ns = 0u64;
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            if self.seq >= self.cfg.max_packets {
                complete = false;
                break;
            }
            let el = (now - t0).as_nanos() as u64;
            let mut total = 0u64;
            for (d, p) in dues.iter_mut().zip(pacers.iter_mut()) {
                *d = p.due(el);
                total = total.saturating_add(*d);
            }
            if total == 0 {
                let next = pacers.iter().map(|p| p.when_due(1)).min().unwrap_or(u64::MAX);
                sleep_until((t0 + Duration::from_nanos(next.min(want.as_nanos() as u64))).min(end));
                continue;
            }
            if total < cap as u64 && el < last_send_ns + tick_ns {
                sleep_until((t0 + Duration::from_nanos(last_send_ns + tick_ns)).min(end));
                continue;
            }
            let room = (cap as u64).min(self.cfg.max_packets - self.seq) as usize;
            self.batch.clear();
            let sent_ns = self.start.elapsed().as_nanos() as u64;
            'fill: loop {
                let mut any = false;
                for (s, due) in dues.iter_mut().enumerate() {
                    if *due == 0 {
                        continue;
                    }
                    if self.batch.len() == room {
                        break 'fill;
                    }
                    *due -= 1;
                    any = true;
                    let addr = if s == 0 {
                        client_addr(self.picker.pick())
                    } else {
                        self.cfg.abusers[s - 1].addr
                    };
                    let seq = self.seq;
                    self.seq += 1;
                    self.stream_of[self.batch.len()] = s as u16;
                    match &self.nts {
                        None => fill_request(self.batch.push(addr), &self.template, &self.codec, seq),
                        Some(nts) => {
                            let mut header = [0u8; HEADER_LEN];
                            fill_request(&mut header, &self.template, &self.codec, seq);
                            nts.request(&mut self.scratch, &header, seq);
                            self.batch.push_bytes(addr, &self.scratch);
                        }
                    }
                    self.tracker.record(
                        seq,
                        Sent {
                            stream: s as u16,
                            step,
                            sent_ns,
                        },
                    );
                }
                if !any {
                    break;
                }
            }
            let n = self.batch.len();
            let fd = self.fds[self.rr % self.fds.len()];
            self.rr = self.rr.wrapping_add(1);
            let result = match self.xdp {
                Some(xdp) => xdp.send(n, |i| self.batch.payload(i)),
                None => self.batch.send(fd),
            };
            let ok = match result {
                Ok(k) => k,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EAGAIN | libc::ENOBUFS | libc::ECONNREFUSED | libc::EPERM)
                    ) =>
                {
                    0
                }
                Err(e) => return Err(e),
            };
            for (i, &s) in self.stream_of[..n].iter().enumerate() {
                pacers[s as usize].emitted += 1;
                if i < ok {
                    self.stream_sent[s as usize] += 1;
                }
            }
            sent += ok as u64;
            errors += (n - ok) as u64;
            last_send_ns = el;
            self.shared.sent.fetch_add(ok as u64, Ordering::Relaxed);
        }
        Ok(StepSent {
            offered,
            sent,
            errors,
            skipped: pacers.iter().map(|p| p.skipped).sum(),
            duration: Instant::now().min(end) - t0,
            complete,
        })
    }

    fn step_loss(&self, step: usize, s: &StepSent) -> f64 {
        let replies = self.shared.step_replies[step].load(Ordering::Relaxed);
        if s.sent == 0 {
            1.0
        } else {
            1.0 - replies as f64 / s.sent as f64
        }
    }

    fn drive(&mut self) -> io::Result<(Vec<StepSent>, Option<RampResult>)> {
        let drain = self.cfg.drain;
        match self.cfg.shape.clone() {
            Shape::Fixed { rate } => Ok((vec![self.step(0, Some(rate), self.cfg.duration)?], None)),
            Shape::Max => Ok((vec![self.step(0, None, self.cfg.duration)?], None)),
            Shape::Ramp(plan) => {
                let mut steps = Vec::new();
                let mut rate = plan.start;
                let mut best: Option<(f64, usize)> = None;
                let mut lowest_bad: Option<f64> = None;
                let mut refines = 0;
                let mut retried = 0;
                let mut generator_limited = false;
                let ended_by = loop {
                    if steps.len() >= MAX_STEPS || self.out_of_budget() {
                        break "budget";
                    }
                    let i = steps.len();
                    let s = self.step(i as u16, Some(rate), plan.step_duration)?;
                    // Let this step's replies arrive (and the server's queue empty) before judging.
                    thread::sleep(drain);
                    let loss = self.step_loss(i, &s);
                    let wanted = s.offered.unwrap_or(0.0) * s.duration.as_secs_f64();
                    let generator_ok = s.sent as f64 >= 0.95 * wanted;
                    let complete = s.complete;
                    steps.push(s);
                    if !complete {
                        break "budget";
                    }
                    let failed = loss > plan.max_loss || !generator_ok;
                    if failed && retried < plan.retries {
                        retried += 1;
                        continue;
                    }
                    retried = 0;
                    // A step the generator could not send at full rate proves nothing about the
                    // server: it is bisected like a lossy one, and the result says so.
                    generator_limited |= !generator_ok && loss <= plan.max_loss;
                    if failed {
                        lowest_bad = Some(lowest_bad.map_or(rate, |b: f64| b.min(rate)));
                    } else {
                        best = Some((rate, i));
                    }
                    match lowest_bad {
                        None => rate = plan.add.map_or(rate * plan.factor, |a| rate + a),
                        Some(bad) => {
                            let lo = best.map_or(0.0, |b| b.0);
                            if refines >= plan.refine || bad - lo <= 0.01 * bad {
                                break if generator_limited { "generator" } else { "loss" };
                            }
                            refines += 1;
                            rate = (lo + bad) / 2.0;
                        }
                    }
                };
                let abusers = self.cfg.abuser_rate();
                let result = match best {
                    Some((_, i)) => {
                        let s = &steps[i];
                        let loss = self.step_loss(i, s);
                        let replies = self.shared.step_replies[i].load(Ordering::Relaxed);
                        RampResult {
                            max_rate: s.offered.unwrap_or(0.0),
                            reply_rate: replies as f64 / s.duration.as_secs_f64().max(1e-9),
                            loss_pct: loss * 100.0,
                            max_loss_pct: plan.max_loss * 100.0,
                            first_failing_rate: lowest_bad.map(|b| b + abusers),
                            ended_by,
                        }
                    }
                    None => RampResult {
                        max_rate: 0.0,
                        reply_rate: 0.0,
                        loss_pct: 100.0,
                        max_loss_pct: plan.max_loss * 100.0,
                        first_failing_rate: lowest_bad.map(|b| b + abusers),
                        ended_by,
                    },
                };
                Ok((steps, Some(result)))
            }
        }
    }
}

/// Runs the load described by `cfg` and returns what it found.
pub fn run(cfg: &RunConfig) -> Result<Report, RunError> {
    cfg.check()?;
    let sockets: Vec<GenSocket> = (0..cfg.ports)
        .map(|_| GenSocket::new(cfg.socket_buffer))
        .collect::<io::Result<_>>()?;
    let fds: Vec<RawFd> = sockets.iter().map(GenSocket::fd).collect();
    let tracker = Arc::new(Tracker::new(cfg.ring_bits));
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        step_replies: (0..MAX_STEPS).map(|_| AtomicU64::new(0)).collect(),
        sent: AtomicU64::new(0),
        replies: AtomicU64::new(0),
    });
    let streams = 1 + cfg.abusers.len();
    let codec = SeqCodec {
        base: NtpTimestamp::from_unix_nanos(realtime_ns() as i128),
    };
    let template = request_template(cfg.version);
    let nts = match &cfg.nts {
        Some(plan) => Some(Arc::new(crate::nts::NtsKeys::establish(plan).map_err(RunError::Nts)?)),
        None => None,
    };
    let xdp = match &cfg.xdp {
        Some(dev) => Some(XdpPath::open(dev, cfg.target, cfg.cpu).map_err(RunError::Xdp)?),
        None => None,
    };
    let xdp = xdp.as_ref();
    let start = Instant::now();
    let snmp_before = if cfg.snmp_check { read_udp() } else { None };

    let (rx_out, tx_out) = thread::scope(|scope| {
        let receiver = Receiver {
            target: cfg.target,
            kind: cfg.kind,
            codec,
            template,
            version: cfg.version,
            time_bound: NtpDuration::from_nanos(cfg.time_bound.as_nanos().min(i64::MAX as u128) as i64),
            start,
            tracker: tracker.clone(),
            shared: shared.clone(),
            nts: nts.clone(),
            xdp,
        };
        let rx_fds = fds.clone();
        let rx = scope.spawn(move || {
            pin(cfg.cpu);
            receiver.run(&rx_fds, streams)
        });
        let tx_shared = shared.clone();
        let tx_tracker = tracker.clone();
        let tx_fds = fds.clone();
        let tx = scope.spawn(move || {
            pin(cfg.cpu);
            tighten_timer_slack();
            let mut sender = Sender {
                cfg,
                fds: tx_fds,
                batch: SendBatch::new(cfg.batch, cfg.target, cfg.claims_sources()),
                stream_of: vec![0; cfg.batch],
                template,
                codec,
                tracker: tx_tracker,
                shared: tx_shared.clone(),
                start,
                deadline: Instant::now() + cfg.duration,
                nts: nts.clone(),
                scratch: Vec::with_capacity(crate::net::MAX_SEND_LEN),
                picker: match cfg.zipf {
                    Some(s) => Picker::zipf(cfg.clients, s, cfg.seed),
                    None => Picker::uniform(cfg.clients),
                },
                seq: 0,
                stream_sent: vec![0; streams],
                rr: 0,
                xdp,
            };
            let r = sender.drive();
            if !matches!(cfg.shape, Shape::Ramp(_)) {
                thread::sleep(cfg.drain);
            }
            tx_shared.stop.store(true, Ordering::Release);
            r.map(|(steps, ramp)| (steps, ramp, sender.stream_sent))
        });
        show_progress(cfg, &shared, &tx, start);
        let tx_out = tx.join().expect("sender thread panicked");
        if tx_out.is_err() {
            shared.stop.store(true, Ordering::Release);
        }
        (rx.join().expect("receiver thread panicked"), tx_out)
    });
    let (steps_sent, ramp, stream_sent) = tx_out?;
    let rx = rx_out?;
    let snmp_after = if cfg.snmp_check { read_udp() } else { None };
    drop(sockets);

    let mut total = Tally::new();
    for t in &rx.steps {
        total.add(t);
    }
    for (i, n) in rx.loose.iter().enumerate() {
        total.invalid[i] += n;
    }
    let sent: u64 = steps_sent.iter().map(|s| s.sent).sum();
    let duration_s: f64 = steps_sent
        .iter()
        .map(|s| s.duration.as_secs_f64())
        .sum::<f64>()
        .max(1e-9);
    let loss = |sent: u64, replies: u64| {
        if sent == 0 {
            0.0
        } else {
            100.0 * (1.0 - replies as f64 / sent as f64)
        }
    };
    let empty = Tally::new();
    let steps: Vec<StepReport> = steps_sent
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = rx.steps.get(i).unwrap_or(&empty);
            let d = s.duration.as_secs_f64().max(1e-9);
            StepReport {
                offered_rate: s.offered,
                duration_s: d,
                sent: s.sent,
                send_rate: s.sent as f64 / d,
                replies: t.replies,
                reply_rate: t.replies as f64 / d,
                loss_pct: loss(s.sent, t.replies),
                complete: s.complete,
                rtt_us: Percentiles::of(&t.rtt),
            }
        })
        .collect();
    let mut stream_reports = vec![StreamReport {
        name: format!("population ({} clients)", cfg.clients),
        rate: match &cfg.shape {
            Shape::Fixed { rate } => Some(*rate),
            _ => None,
        },
        sent: stream_sent[0],
        replies: rx.streams[0].0,
        kiss: rx.streams[0].1,
    }];
    for (i, a) in cfg.abusers.iter().enumerate() {
        stream_reports.push(StreamReport {
            name: format!("abuser {}", a.addr),
            rate: Some(a.rate),
            sent: stream_sent[i + 1],
            replies: rx.streams[i + 1].0,
            kiss: rx.streams[i + 1].1,
        });
    }
    Ok(Report {
        target: cfg.target.to_string(),
        shape: match cfg.shape {
            Shape::Fixed { .. } => "fixed",
            Shape::Max => "max",
            Shape::Ramp(_) => "ramp",
        },
        echo: cfg.kind == ReplyKind::Echo,
        clients: cfg.clients,
        zipf: cfg.zipf,
        ports: cfg.ports,
        offered_rate: match cfg.shape {
            Shape::Fixed { rate } => Some(rate + cfg.abuser_rate()),
            _ => None,
        },
        duration_s,
        sent,
        send_rate: sent as f64 / duration_s,
        send_errors: steps_sent.iter().map(|s| s.errors).sum(),
        skipped: steps_sent.iter().map(|s| s.skipped).sum(),
        replies: total.replies,
        reply_rate: total.replies as f64 / duration_s,
        loss_pct: loss(sent, total.replies),
        good: total.good,
        kiss: Kiss::ALL.iter().map(|k| (k.name(), total.kiss[*k as usize])).collect(),
        invalid: Invalid::ALL
            .iter()
            .map(|r| (r.name(), total.invalid[*r as usize]))
            .collect(),
        invalid_total: total.invalid.iter().sum(),
        leap: total.leap,
        stratum: total
            .stratum
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(s, n)| (s as u8, *n))
            .collect::<BTreeMap<u8, u64>>(),
        rtt_us: Percentiles::of(&total.rtt),
        streams: stream_reports,
        steps,
        ramp,
        snmp: match (snmp_before, snmp_after) {
            (Some(b), Some(a)) => Some(SnmpCheck::new(b, a, sent, total.replies)),
            _ => None,
        },
        histogram: total.rtt,
    })
}

/// A progress bar on stderr for runs of a few seconds or more, when stderr is a terminal.
fn show_progress<T>(cfg: &RunConfig, shared: &Shared, tx: &thread::ScopedJoinHandle<'_, T>, start: Instant) {
    use std::io::IsTerminal;
    if !cfg.progress || cfg.duration < Duration::from_secs(3) || !io::stderr().is_terminal() {
        return;
    }
    let bar = indicatif::ProgressBar::new(cfg.duration.as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {elapsed}/{duration} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    while !tx.is_finished() {
        thread::sleep(Duration::from_millis(200));
        let el = start.elapsed();
        bar.set_position(el.as_millis() as u64);
        let sent = shared.sent.load(Ordering::Relaxed);
        let replies = shared.replies.load(Ordering::Relaxed);
        bar.set_message(format!(
            "sent {sent} replies {replies} ({:.0}/s)",
            replies as f64 / el.as_secs_f64().max(1e-9)
        ));
    }
    bar.finish_and_clear();
}

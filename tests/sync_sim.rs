//! Simulation tests for the sync algorithms on virtual time: simulated upstream servers (offset,
//! delay, jitter, loss, asymmetry, falsetickers, Kiss-o'-Death) and a local clock with an offset,
//! a frequency error and drift, driving the same `SyncCore` the sync thread runs. Thresholds are
//! those of chrony's simulation tests. No sleeps, no sockets.

use gnomon::clock::ClockState;
use gnomon::proto::{
    LeapIndicator, NtpShort, NtpTimestamp, RefId, ReplyTemplate, ServerInfo, respond, stamp_transmit, write_reply,
};
use gnomon::sync::kernel::KERNEL_SLEW;
use gnomon::sync::{
    ClockMode, MAX_SOURCES, SimulatedKernel, SyncConfig, SyncCore, SyncReport, Timeline, UpstreamConfig, render_status,
};
use std::net::SocketAddr;

const NS: i64 = 1_000_000_000;
const T0: i64 = 1_750_000_000 * NS;
const MINUTE: i64 = 60 * NS;
const HOUR: i64 = 60 * MINUTE;
/// How often the error of served time is sampled between events.
const PROBE_NS: i64 = 4 * NS;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn gauss(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// The local (kernel realtime) clock as a function of true time.
struct LocalClock {
    offset: f64,
    frequency: f64,
    /// Frequency change per second (s/s^2).
    drift: f64,
    /// True time at the start of the simulation.
    start: i64,
}

impl LocalClock {
    fn local_of_true(&self, true_ns: i64) -> i64 {
        let dt = (true_ns - self.start) as f64 * 1e-9;
        true_ns + ((self.offset + self.frequency * dt + 0.5 * self.drift * dt * dt) * 1e9).round() as i64
    }
    fn true_of_local(&self, local_ns: i64) -> i64 {
        let mut t = local_ns;
        for _ in 0..4 {
            t += local_ns - self.local_of_true(t);
        }
        t
    }
}

#[derive(Clone)]
struct SimServer {
    addr: SocketAddr,
    /// Error of the server's clock (s).
    offset: f64,
    /// Minimum round trip (s).
    delay: f64,
    /// Extra one-way delay per direction, |N(0, jitter)| (s).
    jitter: f64,
    /// Extra forward delay (s): shifts the measured offset by half of it.
    asymmetry: f64,
    loss: f64,
    kiss: Option<RefId>,
    up: bool,
}

impl SimServer {
    fn good(i: u8) -> SimServer {
        SimServer {
            addr: SocketAddr::from(([127, 0, 0, i], 123)),
            offset: 0.0,
            delay: 0.01,
            jitter: 100e-6,
            asymmetry: 0.0,
            loss: 0.0,
            kiss: None,
            up: true,
        }
    }
}

/// A simulated name server for pool names: each answer hands out fresh addresses (after some
/// handed out before), and every `dead_every`-th address ever handed out is a dead server.
struct SimDns {
    /// Answers on their way: (local arrival time, lookup id).
    pending: Vec<(i64, usize)>,
    /// From a lookup to its answer; `None`: the name server never answers.
    delay: Option<i64>,
    per_answer: usize,
    /// The first this many addresses ever handed out head every answer again, as real pool
    /// names return known addresses.
    repeat: usize,
    dead_every: Option<usize>,
    handed_out: Vec<SocketAddr>,
    lookups: usize,
}

impl SimDns {
    fn new(delay: Option<i64>, per_answer: usize, repeat: usize, dead_every: Option<usize>) -> SimDns {
        SimDns {
            pending: Vec::new(),
            delay,
            per_answer,
            repeat,
            dead_every,
            handed_out: Vec::new(),
            lookups: 0,
        }
    }
}

struct Sim {
    core: SyncCore,
    dns: Option<SimDns>,
    /// Most sources at once, in total and in one name, and whether one address was ever a
    /// source twice.
    max_sources: usize,
    max_per_name: usize,
    duplicates: bool,
    clock: LocalClock,
    servers: Vec<SimServer>,
    rng: Rng,
    /// (local arrival time, from, reply)
    in_flight: Vec<(i64, SocketAddr, [u8; 48])>,
    now: i64,
    state: ClockState,
    next_probe: i64,
    requests: Vec<(i64, SocketAddr)>,
    /// Publishes that changed the correction discontinuously (other than the first step).
    jumps: usize,
    steps: usize,
    max_frequency: f64,
    /// Local time of the first synchronised publish.
    synced_at: Option<i64>,
    /// Largest |error| of served time after `measure_from`, and the worst error minus the
    /// advertised root distance while replies claim to be synchronised.
    measure_from: i64,
    max_error: f64,
    worst_margin: f64,
    published: usize,
    /// Mode system: the kernel clock steered by the timeline. The local clock above is then the
    /// oscillator (the raw timeline), and replies are served from the kernel clock.
    kernel: Option<SteeredKernel>,
    /// A leap second the servers announce and make: (true time of the step, step of UTC).
    leap: Option<(i64, i64)>,
    leaps_seen: u32,
}

struct SteeredKernel {
    timeline: Timeline,
    kernel: SimulatedKernel,
    /// What the workers read: the correction of the kernel clock.
    snapshot: ClockState,
    /// Largest |kernel clock - true time| after `measure_from`.
    max_kernel_error: f64,
    /// Snapshot changes that moved served time by more than a few ns.
    jumps: usize,
}

impl SteeredKernel {
    fn steer(&mut self, state: &ClockState, raw: i64) {
        self.kernel.oscillator_ns = raw;
        self.timeline.steer(&mut self.kernel, state, raw);
        let next = self.timeline.snapshot(state);
        let k = self.kernel.realtime_at(raw);
        if self.snapshot.is_synchronized() && (next.true_time_ns(k) - self.snapshot.true_time_ns(k)).abs() > 4 {
            self.jumps += 1;
        }
        self.snapshot = next;
    }
}

fn upstream(s: &SimServer, iburst: bool) -> UpstreamConfig {
    let mut u = UpstreamConfig::new(&s.addr.ip().to_string());
    u.iburst = iburst;
    u
}

impl Sim {
    fn new(clock: LocalClock, servers: Vec<SimServer>, iburst: bool, seed: u64) -> Sim {
        let config = SyncConfig {
            upstreams: servers.iter().map(|s| upstream(s, iburst)).collect(),
            ..SyncConfig::default()
        };
        Sim::with_config(clock, &config, servers, seed)
    }

    /// Upstreams given by IP address are sources from the start; names go to `dns`.
    fn with_config(clock: LocalClock, config: &SyncConfig, servers: Vec<SimServer>, seed: u64) -> Sim {
        let now = clock.local_of_true(clock.start);
        let core = SyncCore::new(config, -23, now);
        let state = core.state();
        Sim {
            core,
            dns: None,
            max_sources: 0,
            max_per_name: 0,
            duplicates: false,
            clock,
            servers,
            rng: Rng(seed),
            in_flight: Vec::new(),
            now,
            state,
            next_probe: now,
            requests: Vec::new(),
            jumps: 0,
            steps: 0,
            max_frequency: 0.0,
            synced_at: None,
            measure_from: i64::MAX,
            max_error: 0.0,
            worst_margin: f64::NEG_INFINITY,
            published: 0,
            kernel: None,
            leap: None,
            leaps_seen: 0,
        }
    }

    /// UTC (what a server's clock and served time read) at true time `true_ns`.
    fn utc(&self, true_ns: i64) -> i64 {
        match self.leap {
            Some((at, step)) if true_ns >= at => true_ns + step,
            _ => true_ns,
        }
    }

    /// Mode system: the kernel clock starts equal to the local clock, with no frequency setting.
    fn steer_kernel(mut self) -> Sim {
        let mut kernel = SimulatedKernel::new(self.now, 0.0);
        let timeline = Timeline::new(true, gnomon::sync::KernelClock::read(&mut kernel), 0.0);
        self.kernel = Some(SteeredKernel {
            snapshot: timeline.snapshot(&self.state),
            timeline,
            kernel,
            max_kernel_error: 0.0,
            jumps: 0,
        });
        self
    }

    fn publish(&mut self, new: ClockState) {
        // Compared where it takes over: a state moved across a leap second keeps its base.
        let at = new.base_realtime_ns.max(self.now);
        if self.state.is_synchronized() {
            // Served time, a scheduled leap second included: moving the correction by the leap
            // once it has been served is no jump. In mode system the kernel clock makes the
            // leap, and the engine's correction of the raw timeline moves with it.
            let leapt = self.core.leaps_applied() != self.leaps_seen;
            self.leaps_seen = self.core.leaps_applied();
            let expected = match (leapt, self.kernel.is_some(), self.leap) {
                (true, true, Some((_, step))) => step,
                _ => 0,
            };
            if (new.true_time_ns(at) - self.state.true_time_ns(at) - expected).abs() > 1 {
                self.jumps += 1;
            }
        } else if new.is_synchronized() {
            self.steps += 1;
        }
        self.max_frequency = self.max_frequency.max(new.frequency.abs());
        if new.is_synchronized() && self.synced_at.is_none() {
            self.synced_at = Some(at);
        }
        self.state = new;
        self.published += 1;
        if let Some(k) = &mut self.kernel {
            k.steer(&new, self.now);
        }
    }

    fn probe(&mut self) {
        // The kernel's own leap second (mode system) is seen as the sync thread would: at a
        // wake-up, by the timeline; the engine then moves with it.
        let leapt = self.kernel.as_mut().is_some_and(|k| {
            k.kernel.oscillator_ns = self.now;
            let (raw, stepped) = k.timeline.observe(gnomon::sync::KernelClock::read(&mut k.kernel));
            assert!((raw - self.now).abs() <= 2, "raw {raw} vs oscillator {}", self.now);
            k.timeline.take_kernel_leap() || {
                if stepped {
                    // Republish, and in system mode start slewing the kernel back.
                    k.timeline.steer(&mut k.kernel, &self.state, raw);
                    k.snapshot = k.timeline.snapshot(&self.state);
                }
                false
            }
        });
        if leapt {
            let s = self.core.kernel_leap(self.now).expect("a leap was due");
            self.publish(s);
        }
        let info = self.state.server_info(self.now);
        if info.stratum >= 16 {
            return;
        }
        let utc = self.utc(self.clock.true_of_local(self.now));
        let error = (self.state.true_time_ns(self.now) - utc) as f64 * 1e-9;
        let distance = self.state.root_delay / 2.0 + self.state.root_dispersion_at(self.now);
        self.worst_margin = self.worst_margin.max(error.abs() - distance);
        if self.now >= self.measure_from {
            self.max_error = self.max_error.max(error.abs());
        }
        if let Some(k) = &mut self.kernel {
            let true_ns = utc;
            let kernel_ns = k.kernel.realtime_at(self.now);
            // What a worker stamps: the kernel clock corrected by the snapshot.
            let served = (k.snapshot.true_time_ns(kernel_ns) - true_ns) as f64 * 1e-9;
            assert!((served - error).abs() < 1e-8, "served {served} vs engine {error}");
            if self.now >= self.measure_from {
                k.max_kernel_error = k.max_kernel_error.max((kernel_ns - true_ns).abs() as f64 * 1e-9);
            }
        }
    }

    fn reply(&mut self, s: &SimServer, req: &[u8; 48], t1_local: i64) -> Option<(i64, [u8; 48])> {
        if !s.up || self.rng.uniform() < s.loss {
            return None;
        }
        let t1 = self.clock.true_of_local(t1_local);
        let fwd = s.delay / 2.0 + s.asymmetry + s.jitter * self.rng.gauss().abs();
        let back = s.delay / 2.0 + s.jitter * self.rng.gauss().abs();
        let t2 = t1 + (fwd * 1e9) as i64;
        let t3 = t2 + 20_000;
        let t4 = t3 + (back * 1e9) as i64;
        let server_ns = |t: i64| NtpTimestamp::from_unix_nanos((self.utc(t) + (s.offset * 1e9) as i64).into());
        // Announced until it is made, as ntpd and chrony servers do.
        let leap = match self.leap {
            Some((at, step)) if t2 < at && step < 0 => LeapIndicator::AddSecond,
            Some((at, _)) if t2 < at => LeapIndicator::DeleteSecond,
            _ => LeapIndicator::NoWarning,
        };
        let reply = match s.kiss {
            Some(code) => {
                let mut b = *req;
                write_reply(&mut b, &ReplyTemplate::kiss(code), server_ns(t2));
                stamp_transmit(&mut b, server_ns(t3));
                b
            }
            None => {
                let info = ServerInfo {
                    leap,
                    stratum: 1,
                    precision: -20,
                    root_delay: NtpShort::ZERO,
                    root_dispersion: NtpShort::from_seconds_ceil(1e-5),
                    reference_id: RefId(*b"GPS\0"),
                    reference_timestamp: server_ns(t2 - NS),
                };
                respond(req, &info, server_ns(t2), server_ns(t3)).expect("client request")
            }
        };
        Some((self.clock.local_of_true(t4), reply))
    }

    /// The next answer of the simulated name server: addresses handed out before, then fresh
    /// ones, each fresh one a new server (dead or alive).
    fn dns_answer(&mut self) -> Vec<SocketAddr> {
        let dns = self.dns.as_mut().expect("simulated DNS");
        let mut addrs: Vec<SocketAddr> = dns.handed_out.iter().take(dns.repeat).copied().collect();
        while addrs.len() < dns.per_answer {
            let i = dns.handed_out.len();
            let addr = SocketAddr::from(([127, 1, (i >> 8) as u8, i as u8], 123));
            let mut s = SimServer::good(0);
            s.addr = addr;
            s.up = dns.dead_every.is_none_or(|n| i % n != n - 1);
            dns.handed_out.push(addr);
            self.servers.push(s);
            addrs.push(addr);
        }
        addrs
    }

    /// Hands the engine's lookups to the simulated name server, and records the source counts.
    fn lookups(&mut self, now: i64) {
        let mut out = Vec::new();
        self.core.lookups(now, &mut out);
        for l in out {
            let dns = self.dns.as_mut().expect("a lookup needs the simulated DNS");
            dns.lookups += 1;
            if let Some(d) = dns.delay {
                dns.pending.push((now + d, l.id));
            }
        }
        self.count_sources();
    }

    fn count_sources(&mut self) {
        let mut addrs: Vec<SocketAddr> = self.core.sources().map(|s| s.addr).collect();
        self.max_sources = self.max_sources.max(addrs.len());
        let mut names: Vec<&str> = self.core.sources().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        let per_name = names.chunk_by(|a, b| a == b).map(<[&str]>::len).max().unwrap_or(0);
        self.max_per_name = self.max_per_name.max(per_name);
        addrs.sort_unstable();
        addrs.dedup();
        self.duplicates |= addrs.len() != self.core.sources().count();
    }

    /// Runs until local time `end` (relative to the start of the simulation).
    fn run_for(&mut self, duration: i64) {
        let end = self.now + duration;
        loop {
            let arrival = self.in_flight.iter().map(|f| f.0).min();
            let steer_at = self.kernel.as_ref().and_then(|k| k.timeline.deadline());
            let answer_at = self.dns.as_ref().and_then(|d| d.pending.iter().map(|p| p.0).min());
            let next = [
                self.core.next_deadline(),
                arrival,
                Some(self.next_probe),
                steer_at,
                answer_at,
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("probe always due");
            if next > end {
                self.now = end;
                break;
            }
            self.now = next;
            if next == self.next_probe {
                self.probe();
                self.next_probe += PROBE_NS;
            }
            if steer_at == Some(next) {
                let state = self.state;
                if let Some(k) = &mut self.kernel {
                    k.steer(&state, next);
                }
            }
            if answer_at == Some(next) {
                let dns = self.dns.as_mut().unwrap();
                let k = dns.pending.iter().position(|p| p.0 == next).unwrap();
                let (_, id) = dns.pending.swap_remove(k);
                let addrs = self.dns_answer();
                self.core.resolved(id, Ok(addrs), next);
                self.count_sources();
                continue;
            }
            if let Some(k) = self.in_flight.iter().position(|f| f.0 == next) {
                let (t4, from, reply) = self.in_flight.swap_remove(k);
                if let Some(s) = self.core.handle_reply(from, &reply, t4) {
                    self.publish(s);
                }
                continue;
            }
            let mut out = Vec::new();
            let rng = &mut self.rng;
            self.core.poll(next, &mut || rng.next(), &mut out);
            for (addr, req) in out {
                self.requests.push((next, addr));
                let s = self
                    .servers
                    .iter()
                    .find(|s| s.addr == addr)
                    .expect("known server")
                    .clone();
                if let Some((t4, reply)) = self.reply(&s, &req, next) {
                    self.in_flight.push((t4.max(next + 1), addr, reply));
                }
            }
            self.lookups(next);
            if let Some(s) = self.core.tick(next) {
                self.publish(s);
            }
        }
    }

    fn report(&self) -> SyncReport {
        self.core.report(self.now)
    }

    fn summary(&self, name: &str) {
        eprintln!(
            "{name}: synced at {:?} s, max |error| {:.1} us, worst error - distance {:.6} s, {} publishes, max freq {:.1} ppm",
            self.synced_at.map(|t| (t - self.clock.local_of_true(T0)) / NS),
            self.max_error * 1e6,
            self.worst_margin,
            self.published,
            self.max_frequency * 1e6
        );
    }

    fn assert_continuous(&self) {
        self.summary("run");
        assert_eq!(self.jumps, 0, "published correction jumped after first sync");
        assert!(self.steps <= 1, "{} steps", self.steps);
        assert!(self.max_frequency < 0.5e-3, "frequency {}", self.max_frequency);
        assert!(self.published > 0);
    }
}

fn cold_clock() -> LocalClock {
    LocalClock {
        offset: 0.1,
        frequency: 100e-6,
        drift: 1e-11,
        start: T0,
    }
}

fn tally(r: &SyncReport, addr: SocketAddr) -> (char, String) {
    let s = r
        .sources
        .iter()
        .find(|s| s.addr == Some(addr))
        .expect("source in report");
    (s.tally, s.why.clone().unwrap_or_default())
}

#[test]
fn cold_start_100ms_100ppm_syncs_within_10_minutes() {
    let mut sim = Sim::new(cold_clock(), vec![SimServer::good(1)], false, 1);
    sim.measure_from = sim.now + 10 * MINUTE;
    sim.run_for(6 * HOUR);
    let synced = sim.synced_at.expect("synchronised") - sim.clock.local_of_true(T0);
    assert!(synced < 10 * MINUTE, "synced after {} s", synced / NS);
    assert!(sim.max_error < 1e-3, "max offset {} s after 10 minutes", sim.max_error);
    assert!(
        sim.worst_margin <= 0.0,
        "error beyond root distance by {}",
        sim.worst_margin
    );
    assert!(sim.state.is_synchronized());
    sim.assert_continuous();
    let r = sim.report();
    assert_eq!(r.sources[0].tally, '*');
    assert_eq!(r.system.stratum, 2);
    assert_eq!(r.system.refid, "127.0.0.1");
    // The kernel clock runs 100 ppm fast: the correction runs at -100 ppm.
    assert!(
        (r.system.frequency_ppm + 100.0).abs() < 1.0,
        "{}",
        r.system.frequency_ppm
    );
}

/// Mode system on the same cold start: the kernel clock itself ends up within 1 ms of true
/// time, while served time (kernel clock plus what the snapshot still corrects) is exactly what
/// the engine computes at every probe, and never jumps.
#[test]
fn system_mode_cold_start_steers_the_kernel_clock() {
    let mut sim = Sim::new(cold_clock(), vec![SimServer::good(1)], false, 1).steer_kernel();
    sim.measure_from = sim.now + 15 * MINUTE;
    sim.run_for(2 * HOUR);
    sim.assert_continuous();
    assert!(sim.max_error < 1e-3, "served max offset {} s", sim.max_error);
    let k = sim.kernel.as_ref().unwrap();
    eprintln!(
        "kernel: max |error| {:.1} us after 15 minutes, {} adjtimex calls, setting {:+.3} ppm",
        k.max_kernel_error * 1e6,
        k.kernel.calls,
        k.timeline.frequency_setting() * 1e6
    );
    assert!(
        k.max_kernel_error < 1e-3,
        "kernel clock max offset {} s",
        k.max_kernel_error
    );
    assert_eq!(k.jumps, 0, "served time jumped when the kernel was steered");
    assert_eq!(k.timeline.external_steps, 0);
    // The local oscillator runs 100 ppm fast: the kernel is set about 100 ppm slow.
    assert!((k.timeline.frequency_setting() * 1e6 + 100.0).abs() < 1.0);
    let r = sim.report();
    assert_eq!(r.sources[0].tally, '*');
    // Someone steps the kernel clock 2 s ahead: served time stays exact at every probe (checked
    // in `probe`), the step is counted, and the kernel is slewed back, not stepped again.
    sim.kernel.as_mut().unwrap().kernel.external_step(2 * NS);
    sim.measure_from = i64::MAX;
    let kernel_error = |sim: &Sim| {
        let k = sim.kernel.as_ref().unwrap();
        (k.kernel.realtime_at(sim.now) - sim.clock.true_of_local(sim.now)) as f64 * 1e-9
    };
    sim.run_for(12 * NS);
    // The step is noticed at the next wake-up, at most one probe interval later.
    let slewed = 12.0 * KERNEL_SLEW;
    let noticed_late = PROBE_NS as f64 * 1e-9 * KERNEL_SLEW;
    assert!(
        (2.0 - slewed - 0.01..2.0 - slewed + noticed_late + 0.01).contains(&kernel_error(&sim)),
        "2 s slewed back at {KERNEL_SLEW} s/s for 12 s leaves {} s: {}",
        2.0 - slewed,
        kernel_error(&sim)
    );
    sim.run_for(10 * MINUTE);
    assert_eq!(sim.kernel.as_ref().unwrap().timeline.external_steps, 1);
    assert!(kernel_error(&sim).abs() < 1e-3, "{}", kernel_error(&sim));
    sim.assert_continuous();
}

#[test]
fn iburst_syncs_within_a_minute() {
    let mut sim = Sim::new(cold_clock(), (1..=3).map(SimServer::good).collect(), true, 2);
    sim.measure_from = sim.now + 10 * MINUTE;
    sim.run_for(2 * HOUR);
    let synced = sim.synced_at.expect("synchronised") - sim.clock.local_of_true(T0);
    assert!(synced < MINUTE, "synced after {} s", synced / NS);
    assert!(sim.max_error < 1e-3, "{}", sim.max_error);
    sim.assert_continuous();
}

fn falsetickers(bad: &[(usize, f64)], seed: u64) {
    let mut servers: Vec<SimServer> = (1..=5).map(SimServer::good).collect();
    for &(i, off) in bad {
        servers[i].offset = off;
    }
    let mut sim = Sim::new(cold_clock(), servers, true, seed);
    sim.measure_from = sim.now + 10 * MINUTE;
    sim.run_for(3 * HOUR);
    assert!(sim.state.is_synchronized());
    assert!(sim.max_error < 1e-3, "max offset {}", sim.max_error);
    sim.assert_continuous();
    let r = sim.report();
    for (i, s) in sim.servers.iter().enumerate() {
        let (t, why) = tally(&r, s.addr);
        if bad.iter().any(|b| b.0 == i) {
            assert_eq!(t, 'x', "{i}: {why}");
            assert!(why.contains("falseticker"), "{why}");
        } else {
            assert!("*+-#".contains(t), "good source {i} has tally {t:?}: {why}");
        }
    }
}

#[test]
fn one_of_five_off_by_one_second_is_a_falseticker() {
    falsetickers(&[(2, 1.0)], 3);
}

#[test]
fn two_of_five_off_by_one_second_are_falsetickers() {
    // Both wrong the same way, so they agree with each other: still a minority.
    falsetickers(&[(0, 1.0), (4, 1.0)], 4);
}

#[test]
fn three_of_five_wrong_refuses_to_steer() {
    let mut servers: Vec<SimServer> = (1..=5).map(SimServer::good).collect();
    servers[0].offset = 1.0;
    servers[1].offset = -1.0;
    servers[2].offset = 2.0;
    let mut sim = Sim::new(cold_clock(), servers, true, 5);
    sim.run_for(HOUR);
    assert_eq!(sim.synced_at, None, "must not synchronise without a majority");
    assert!(!sim.state.is_synchronized());
    let r = sim.report();
    assert!(!r.system.synced);
    let why = r.system.why_unsynced.unwrap();
    assert!(why.contains("no majority"), "{why}");
    assert!(r.sources.iter().all(|s| s.tally == ' '), "{:?}", r.sources);
    assert!(
        r.sources
            .iter()
            .all(|s| s.why.as_deref().unwrap().contains("no majority"))
    );
}

#[test]
fn a_third_of_packets_lost_still_syncs() {
    let mut servers: Vec<SimServer> = (1..=3).map(SimServer::good).collect();
    for s in &mut servers {
        s.loss = 0.33;
    }
    let mut sim = Sim::new(cold_clock(), servers, false, 6);
    sim.measure_from = sim.now + 10 * MINUTE;
    sim.run_for(4 * HOUR);
    let synced = sim.synced_at.expect("synchronised") - sim.clock.local_of_true(T0);
    assert!(synced < 10 * MINUTE, "synced after {} s", synced / NS);
    assert!(sim.max_error < 1e-3, "{}", sim.max_error);
    sim.assert_continuous();
    let r = sim.report();
    assert!(r.sources.iter().any(|s| s.reach != 0xff), "loss shows in reach");
}

#[test]
fn holdover_error_stays_within_root_distance_then_unsynchronised() {
    let mut servers: Vec<SimServer> = (1..=3).map(SimServer::good).collect();
    // Asymmetric paths: an offset error the client cannot see, but root distance covers.
    servers[0].asymmetry = 2e-3;
    servers[1].asymmetry = 1e-3;
    let mut sim = Sim::new(cold_clock(), servers, true, 7);
    sim.run_for(2 * HOUR);
    assert!(sim.state.is_synchronized());
    for s in &mut sim.servers {
        s.up = false;
    }
    let lost_at = sim.now;
    // Eight polls of 1024 s empty the reachability registers.
    sim.run_for(3 * HOUR);
    let r = sim.report();
    assert!(r.system.synced && r.system.holdover, "{:?}", r.system);
    assert!(r.sources.iter().all(|s| s.tally == ' '), "{:?}", r.sources);
    sim.run_for(27 * HOUR);
    assert!(
        sim.worst_margin <= 0.0,
        "true offset beyond root distance by {} s",
        sim.worst_margin
    );
    sim.assert_continuous();
    let r = sim.report();
    assert!(
        !r.system.synced,
        "holdover limit of 1 s root dispersion must have passed"
    );
    assert!(r.system.why_unsynced.unwrap().contains("holdover"));
    assert!(
        r.sources
            .iter()
            .all(|s| s.why.as_deref().unwrap().contains("unreachable (no reply to")),
        "{:?}",
        r.sources
    );
    // Holdover lasted: replies stayed synchronised for a while after the loss.
    let info = sim.state.server_info(lost_at + HOUR);
    assert!(info.stratum < 16);
}

#[test]
fn kiss_rate_lengthens_polling_and_deny_stops_it() {
    let mut servers: Vec<SimServer> = (1..=3).map(SimServer::good).collect();
    servers[1].kiss = Some(RefId::RATE);
    servers[2].kiss = Some(RefId::DENY);
    let (a, b, c) = (servers[0].addr, servers[1].addr, servers[2].addr);
    let mut sim = Sim::new(cold_clock(), servers, false, 8);
    sim.run_for(3 * HOUR);
    let times = |addr| {
        sim.requests
            .iter()
            .filter(|r| r.1 == addr)
            .map(|r| r.0)
            .collect::<Vec<_>>()
    };
    let (ta, tb, tc) = (times(a), times(b), times(c));
    assert_eq!(tc.len(), 1, "DENY: never polled again");
    assert!(
        tb.len() < ta.len(),
        "RATE source polled {} times, good one {}",
        tb.len(),
        ta.len()
    );
    let gaps: Vec<i64> = tb.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "poll never shortens: {gaps:?}");
    assert!(gaps[0] >= 2 * 64 * NS, "first gap {} s", gaps[0] / NS);
    let r = sim.report();
    assert!(tally(&r, b).1.contains("kiss code RATE"), "{:?}", tally(&r, b));
    assert!(tally(&r, c).1.contains("kiss code DENY"), "{:?}", tally(&r, c));
    assert_eq!(tally(&r, a).0, '*');
}

#[test]
fn spoofed_replies_are_rejected_and_counted() {
    let mut sim = Sim::new(cold_clock(), vec![SimServer::good(1)], true, 9);
    sim.run_for(MINUTE);
    let addr = sim.servers[0].addr;
    let before = sim.state;
    // An off-path attacker who does not know our random transmit timestamp.
    let mut forged = [0u8; 48];
    forged[0] = 0x24;
    forged[1] = 1;
    forged[24..32].copy_from_slice(&(sim.now as u64).to_be_bytes());
    forged[32..40].copy_from_slice(&NtpTimestamp::from_unix(2_000_000_000, 0).to_be_bytes());
    forged[40..48].copy_from_slice(&NtpTimestamp::from_unix(2_000_000_000, 0).to_be_bytes());
    for _ in 0..3 {
        assert_eq!(sim.core.handle_reply(addr, &forged, sim.now), None);
    }
    assert_eq!(sim.state, before);
    let why = tally(&sim.report(), addr).1;
    assert!(why.contains("3 spoofed/mismatched replies"), "{why}");
}

fn pool(name: &str) -> UpstreamConfig {
    let mut u = UpstreamConfig::new(name);
    u.pool = true;
    u.iburst = true;
    u
}

fn pool_sim(pools: Vec<UpstreamConfig>, dns: SimDns, seed: u64) -> Sim {
    let config = SyncConfig {
        upstreams: pools,
        ..SyncConfig::default()
    };
    let mut sim = Sim::with_config(cold_clock(), &config, Vec::new(), seed);
    sim.dns = Some(dns);
    sim
}

/// Issue 11 item 12: a pool of which 1 in 3 servers is dead, whose name gives 8 addresses at
/// each lookup (3 known ones, then fresh ones). Dead members are replaced, the pool never
/// holds more than its `max_sources` (4), no address is a source twice, and a day later it has
/// 4 live members and serves synchronised time.
#[test]
fn pool_with_dead_members_stays_within_its_cap_for_a_day() {
    let mut sim = pool_sim(vec![pool("pool.sim")], SimDns::new(Some(50_000_000), 8, 3, Some(3)), 10);
    // The lookup is the engine's to ask for, and it shows until answered.
    sim.run_for(20_000_000);
    let r = sim.report();
    assert_eq!(r.sources.len(), 1, "{:?}", r.sources);
    assert!(
        r.sources[0]
            .why
            .as_deref()
            .unwrap()
            .starts_with("DNS lookup in progress"),
        "{:?}",
        r.sources[0]
    );
    let day = 24 * HOUR;
    sim.run_for(day);
    let dns = sim.dns.as_ref().unwrap();
    eprintln!(
        "pool: {} lookups, {} addresses handed out, at most {} sources, {} now",
        dns.lookups,
        dns.handed_out.len(),
        sim.max_sources,
        sim.core.sources().count()
    );
    assert!(sim.max_sources <= 4, "pool grew to {} members", sim.max_sources);
    assert!(!sim.duplicates, "an address was a source twice");
    assert!(dns.lookups >= 2, "dead members were never replaced");
    let live = sim
        .core
        .sources()
        .filter(|s| sim.servers.iter().any(|v| v.addr == s.addr && v.up))
        .count();
    assert_eq!(
        (sim.core.sources().count(), live),
        (4, 4),
        "dead members replaced by live ones"
    );
    assert!(sim.state.is_synchronized());
    let r = sim.report();
    assert!(
        r.sources.iter().all(|s| s.kind == 'p' && s.addr.is_some()),
        "{:?}",
        r.sources
    );
}

/// Issue 11 item 12: 20 pools of 4 would be 80 sources; the total stays at the cap, and the
/// pools left short say why.
#[test]
fn sources_in_total_stay_within_the_cap() {
    let pools = (0..20).map(|i| pool(&format!("pool{i}.sim"))).collect();
    let mut sim = pool_sim(pools, SimDns::new(Some(10_000_000), 8, 0, None), 11);
    sim.run_for(10 * MINUTE);
    assert_eq!(sim.max_sources, MAX_SOURCES);
    assert_eq!(sim.max_per_name, 4);
    assert!(!sim.duplicates);
    let r = sim.report();
    let capped: Vec<&str> = r
        .sources
        .iter()
        .filter(|s| s.addr.is_none())
        .filter_map(|s| s.why.as_deref())
        .collect();
    assert!(!capped.is_empty(), "{:?}", r.sources);
    assert!(
        capped.iter().all(|w| w.contains("cap of 64 sources in total")),
        "{capped:?}"
    );
    // Only what could be used was asked for: no lookups for pools once the table is full.
    assert!(
        sim.dns.as_ref().unwrap().lookups <= 20,
        "{}",
        sim.dns.as_ref().unwrap().lookups
    );
}

/// Issue 11 item 11, in the engine: a name whose server never answers leaves the other
/// upstreams' polls alone, is asked for once (one lookup in flight per name), and shows as in
/// progress.
#[test]
fn a_lookup_that_never_ends_delays_nothing() {
    let good: Vec<SimServer> = (1..=3).map(SimServer::good).collect();
    let mut upstreams: Vec<UpstreamConfig> = good.iter().map(|s| upstream(s, true)).collect();
    upstreams.insert(1, UpstreamConfig::new("never.sim"));
    let config = SyncConfig {
        upstreams,
        ..SyncConfig::default()
    };
    let mut sim = Sim::with_config(cold_clock(), &config, good, 12);
    sim.dns = Some(SimDns::new(None, 8, 0, None));
    sim.measure_from = sim.now + 10 * MINUTE;
    sim.run_for(2 * HOUR);
    let synced = sim.synced_at.expect("synchronised") - sim.clock.local_of_true(T0);
    assert!(synced < MINUTE, "synced after {} s", synced / NS);
    sim.assert_continuous();
    assert_eq!(sim.dns.as_ref().unwrap().lookups, 1);
    let r = sim.report();
    let row = r.sources.iter().find(|s| s.name == "never.sim").unwrap();
    assert!(
        row.why
            .as_deref()
            .unwrap()
            .starts_with("DNS lookup in progress (7200 s)"),
        "{row:?}"
    );
}

/// Issue 11 item 5: datagrams that are no reply of ours are counted by reason, shown in the
/// report and in `gnomon status`, and none of them ends the request in flight: the genuine
/// reply behind them is still taken.
#[test]
fn stray_datagrams_are_counted_by_reason_and_change_nothing() {
    let server = SimServer::good(1);
    let mut sim = Sim::new(cold_clock(), vec![server.clone()], false, 13);
    // A source's first request leaves INITIAL_DELAY after it is added.
    let now = sim.now + gnomon::sync::source::INITIAL_DELAY_NS;
    let mut out = Vec::new();
    sim.core.poll(now, &mut || 0x1234_5678_9abc_def0, &mut out);
    let (addr, req) = out[0];
    let (t4, genuine) = sim.reply(&server, &req, now).unwrap();
    let mut forged = genuine;
    forged[24] ^= 0xff;
    let stranger = SocketAddr::from(([127, 0, 0, 99], 123));
    assert_eq!(sim.core.handle_reply(addr, &forged, t4), None);
    assert_eq!(sim.core.handle_reply(addr, &genuine[..47], t4), None);
    assert_eq!(sim.core.handle_reply(stranger, &genuine, t4), None);
    sim.core.handle_reply(addr, &genuine, t4);
    assert!(
        sim.core.sources().next().unwrap().reach & 1 == 1,
        "the genuine reply was taken"
    );
    sim.core.handle_reply(addr, &genuine, t4 + 1);
    let r = sim.report();
    let st = r.stray;
    assert_eq!(
        (st.wrong_origin, st.too_short, st.unknown_source, st.unexpected),
        (1, 1, 1, 1),
        "{st:?}"
    );
    assert_eq!(sim.core.stray(), st);
    let status = render_status(&r);
    assert!(
        status.contains("Stray replies   : 4 (unknown source 1, wrong origin 1, unexpected 1, too short 1)"),
        "{status}"
    );
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["stray"]["too_short"], 1, "{json}");
}

/// 2017-01-01 00:00:00 UTC: the end of the last leap day so far (an inserted second).
const NY2017: i64 = 1_483_228_800 * NS;

/// Three upstreams that announce a leap second at the end of 2016-12-31 from the start and make
/// it; the simulation starts on 2016-12-30 at 22:00 UTC.
fn leap_sim(step: i64, config: SyncConfig, system: bool) -> (Sim, i64) {
    let at = if step < 0 { NY2017 } else { NY2017 - NS };
    let clock = LocalClock {
        start: NY2017 - 26 * HOUR,
        ..cold_clock()
    };
    let servers: Vec<SimServer> = (1..=3).map(SimServer::good).collect();
    let config = SyncConfig {
        upstreams: servers.iter().map(|s| upstream(s, true)).collect(),
        mode: if system { ClockMode::System } else { ClockMode::Software },
        ..config
    };
    let mut sim = Sim::with_config(clock, &config, servers, 21);
    if system {
        sim = sim.steer_kernel();
    }
    sim.leap = Some((at, step));
    (sim, at)
}

impl Sim {
    /// Runs until true time `true_ns`.
    fn run_to_true(&mut self, true_ns: i64) {
        let local = self.clock.local_of_true(true_ns);
        self.run_for(local - self.now);
    }

    /// What a client is served now: the time (Unix ns) and the leap indicator. In mode system
    /// through the kernel clock (which makes an armed leap second on its own) and the snapshot the
    /// workers hold, which the sync thread refreshes only when it wakes.
    fn served(&mut self) -> (i64, LeapIndicator) {
        match &mut self.kernel {
            None => (self.state.true_time_ns(self.now), self.state.server_info(self.now).leap),
            Some(k) => {
                k.kernel.oscillator_ns = self.now;
                let rt = gnomon::sync::KernelClock::read(&mut k.kernel).realtime_ns;
                (k.snapshot.true_time_ns(rt), k.snapshot.server_info(rt).leap)
            }
        }
    }
}

/// The leap second in served time, in both clock modes: LI 1/2 only on the last day, the second
/// repeated (insert) or skipped (delete) at its instant, LI 0 after, and served time within 1 ms
/// of UTC on either side of it.
fn leap_second(step: i64, system: bool) {
    let (mut sim, at) = leap_sim(step, SyncConfig::default(), system);
    let li = if step < 0 {
        LeapIndicator::AddSecond
    } else {
        LeapIndicator::DeleteSecond
    };
    // Dec 30: the servers announce it already, but it is not the last day of the month.
    sim.run_to_true(NY2017 - 25 * HOUR);
    assert!(sim.state.is_synchronized());
    assert_eq!(sim.served().1, LeapIndicator::NoWarning);
    let note = sim.report().system.leap_note.unwrap_or_default();
    assert!(note.contains("only on the last day"), "{note}");
    // Dec 31: announced from the first clock update of the day.
    sim.run_to_true(NY2017 - 23 * HOUR);
    assert_eq!(sim.served().1, li, "{:?}", sim.report().system);
    let before = sim.report();
    assert_eq!(
        before.system.leap,
        if step < 0 { "insert second" } else { "delete second" }
    );
    assert!(
        before
            .system
            .leap_note
            .as_deref()
            .unwrap_or_default()
            .contains("majority of selected sources"),
        "{:?}",
        before.system.leap_note
    );
    sim.measure_from = sim.now;
    // Half a second before the step and half a second after it.
    sim.run_to_true(at - NS / 2);
    let (t_before, li_before) = sim.served();
    sim.run_to_true(at + NS / 2);
    let (t_after, li_after) = sim.served();
    let close = |t: i64, want: i64| (t - want).abs() < 1_000_000;
    assert_eq!(li_before, li);
    if step < 0 {
        // 23:59:59.5, then 23:59:60.5 served as 23:59:59.5 again.
        assert!(close(t_before, NY2017 - NS / 2), "{t_before}");
        assert!(close(t_after, NY2017 - NS / 2), "{t_after}: 23:59:59 is not repeated");
    } else {
        // 23:59:58.5, then 00:00:00.5: 23:59:59 never shows.
        assert!(close(t_before, NY2017 - 3 * NS / 2), "{t_before}");
        assert!(close(t_after, NY2017 + NS / 2), "{t_after}: 23:59:59 is not skipped");
    }
    // Mode system: the snapshot the workers hold says LI 0 from the sync thread's next wake-up.
    sim.run_to_true(at + PROBE_NS + NS);
    assert_eq!(sim.served().1, LeapIndicator::NoWarning, "LI cleared after the leap");
    if !system {
        assert_eq!(li_after, LeapIndicator::NoWarning);
    }
    sim.run_for(4 * HOUR);
    let after = sim.report();
    assert_eq!(sim.served().1, LeapIndicator::NoWarning);
    assert_eq!(sim.core.leaps_applied(), 1);
    assert_eq!(after.system.leap, "normal");
    let logged: Vec<String> = gnomon::sync::report::changes(&before, &after)
        .into_iter()
        .map(|e| e.text)
        .collect();
    let applied = if step < 0 {
        "23:59:60 inserted"
    } else {
        "23:59:59 deleted"
    };
    assert!(
        logged.contains(&format!("leap second applied: {applied}")),
        "{logged:?}"
    );
    assert!(sim.state.is_synchronized());
    assert!(
        sim.max_error < 1e-3,
        "served time {} s off UTC around the leap",
        sim.max_error
    );
    sim.assert_continuous();
    if let Some(k) = &sim.kernel {
        assert_eq!(k.kernel.leaps, 1, "the kernel made the leap second");
        assert_eq!(
            k.timeline.external_steps, 0,
            "the kernel's leap is not someone else's step"
        );
        assert!(
            k.max_kernel_error < 1e-3,
            "kernel clock {} s off UTC",
            k.max_kernel_error
        );
    }
}

#[test]
fn leap_second_inserted_in_software_mode() {
    leap_second(-NS, false);
}

#[test]
fn leap_second_deleted_in_software_mode() {
    leap_second(NS, false);
}

#[test]
fn leap_second_inserted_in_system_mode_by_the_kernel() {
    leap_second(-NS, true);
}

#[test]
fn leap_second_deleted_in_system_mode_by_the_kernel() {
    leap_second(NS, true);
}

/// A leap-seconds list that has not expired decides alone: the servers announce nothing, and
/// the second is still inserted; with `leap = "ignore"` nothing is announced or applied.
#[test]
fn leap_second_from_the_list_and_ignored() {
    let text = "#@\t3991593600\n2272060800\t10\n3692217600\t37\n".replace("\t37", "\t11");
    let list = gnomon::sync::LeapList::parse(&text, "test.list").unwrap();
    let config = SyncConfig {
        leap: gnomon::sync::LeapConfig {
            mode: gnomon::sync::LeapMode::Apply,
            list: Some(list),
        },
        ..SyncConfig::default()
    };
    let (mut sim, _) = leap_sim(-NS, config, false);
    // The servers never say so, and never make it: served time must then be a second behind
    // theirs after midnight, as UTC is.
    sim.leap = None;
    sim.run_to_true(NY2017 - HOUR);
    assert_eq!(sim.served().1, LeapIndicator::AddSecond);
    let note = sim.report().system.leap_note.unwrap();
    assert!(note.contains("from test.list"), "{note}");
    sim.run_to_true(NY2017 + NS / 2);
    assert!((sim.served().0 - (NY2017 - NS / 2)).abs() < 1_000_000);
    assert_eq!(sim.core.leaps_applied(), 1);

    let config = SyncConfig {
        leap: gnomon::sync::LeapConfig {
            mode: gnomon::sync::LeapMode::Ignore,
            list: None,
        },
        ..SyncConfig::default()
    };
    let (mut sim, _) = leap_sim(-NS, config, false);
    sim.run_to_true(NY2017 - HOUR);
    assert_eq!(sim.served().1, LeapIndicator::NoWarning);
    sim.run_to_true(NY2017 + NS / 2);
    assert!((sim.served().0 - (NY2017 + NS / 2)).abs() < 1_000_000, "not applied");
    assert_eq!(sim.core.leaps_applied(), 0);
}

/// Upstreams that all claim +10 years (a GPS rollover, a broken server): they agree, so they
/// win selection, but the first correction is over the panic threshold and is refused, with the
/// reason in status, sources --why and the log. Allowed, the first correction is taken; a later
/// jump of the sources by 2000 s is refused again and served time stays put.
#[test]
fn insane_upstreams_are_refused_with_the_reason_shown() {
    let ten_years = 10.0 * 365.25 * 86_400.0;
    let servers: Vec<SimServer> = (1..=3)
        .map(|i| SimServer {
            offset: ten_years,
            ..SimServer::good(i)
        })
        .collect();
    let mut sim = Sim::new(cold_clock(), servers.clone(), true, 31);
    let start = sim.report();
    sim.run_for(HOUR);
    assert_eq!(sim.synced_at, None, "+10 years must never be served as synchronised");
    assert!(!sim.state.is_synchronized());
    let r = sim.report();
    let why = r.system.why_unsynced.clone().unwrap();
    assert!(
        why.contains("refused") && why.contains("+10.0 years") && why.contains("1000 s panic threshold"),
        "{why}"
    );
    assert!(
        render_status(&r).contains("Warning         : refused"),
        "{}",
        render_status(&r)
    );
    let peer_why = gnomon::sync::render_sources(&r, true);
    assert!(peer_why.contains("allow_large_first"), "{peer_why}");
    let logged = gnomon::sync::report::changes(&start, &r);
    assert!(
        logged
            .iter()
            .any(|e| e.level == log::Level::Warn && e.text.contains("panic threshold")),
        "{logged:?}"
    );

    // The operator knows the local clock is wrong (no RTC): the first correction is taken.
    let config = SyncConfig {
        upstreams: servers.iter().map(|s| upstream(s, true)).collect(),
        panic: gnomon::sync::Panic {
            allow_first: true,
            ..gnomon::sync::Panic::default()
        },
        ..SyncConfig::default()
    };
    let mut sim = Sim::with_config(cold_clock(), &config, servers, 32);
    sim.run_for(HOUR);
    assert!(sim.state.is_synchronized());
    assert!(sim.report().system.refused.is_none());
    let served_before = sim.state.true_time_ns(sim.now);
    // Then they all jump by 2000 s more: refused, served time keeps its course (holdover).
    for s in &mut sim.servers {
        s.offset += 2000.0;
    }
    sim.run_for(HOUR);
    let r = sim.report();
    let refused = r.system.refused.clone().unwrap_or_default();
    assert!(refused.contains("after synchronisation"), "{:?}", r.system);
    let drift = (sim.state.true_time_ns(sim.now) - served_before) as f64 * 1e-9 - 3600.0;
    assert!(drift.abs() < 1.0, "served time moved {drift} s off its course");
}

/// With 1 or 2 sources a falseticker cannot be outvoted: status says so (and the log, once).
#[test]
fn fewer_than_three_selectable_sources_are_warned_about() {
    for (n, warned) in [(1, true), (2, true), (3, false)] {
        let mut sim = Sim::new(
            cold_clock(),
            (1..=n).map(SimServer::good).collect(),
            true,
            40 + u64::from(n),
        );
        let start = sim.report();
        sim.run_for(10 * MINUTE);
        let r = sim.report();
        assert!(r.system.synced);
        assert_eq!(
            r.system.few_sources.is_some(),
            warned,
            "{n}: {:?}",
            r.system.few_sources
        );
        let status = render_status(&r);
        assert_eq!(status.contains("a falseticker cannot be outvoted"), warned, "{status}");
        let logged = gnomon::sync::report::changes(&start, &r);
        assert_eq!(
            logged.iter().filter(|e| e.text.contains("cannot be outvoted")).count(),
            usize::from(warned)
        );
    }
}

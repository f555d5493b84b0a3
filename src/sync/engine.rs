//! The sans-IO sync core: the set of sources, selection after every valid reply, the
//! discipline, and the operator's report. The I/O shell (and the simulation tests) feed it
//! datagrams, DNS answers and times and publish the states it returns.
//!
//! The core decides which names to look up and when ([`SyncCore::lookups`]), and what to do
//! with an answer ([`SyncCore::resolved`]); it never waits for one. So a name server that never
//! answers costs nothing but the name's own sources, and the caps on pool members and on
//! sources in total hold whatever DNS returns.

use super::discipline::{Discipline, MIN_SAMPLES_TO_SYNC, SystemEstimate};
use super::filter::Estimate;
use super::leap::{LEAP_CLOSE_NS, LeapControl};
use super::report::{SourceReport, StrayReport, SyncReport, SystemReport};
use super::select::{Candidate, Verdict, select};
use super::source::{Rejection, Source};
use super::{ClockMode, MAX_DISTANCE, MAX_SOURCES, Panic, SyncConfig, UpstreamConfig, nanos_to_secs};
use crate::clock::ClockState;
use crate::proto::{HEADER_LEN, LeapIndicator, RefId};
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};

/// A failed lookup is retried this often, and a name is not looked up again sooner than this
/// after an answer that brought a new address.
pub const DNS_RETRY_NS: i64 = 60_000_000_000;
/// Answers that bring nothing new double the wait up to this (a pool name with fewer addresses
/// than `max_sources` is not asked every minute forever).
const MAX_LOOKUP_BACKOFF_NS: i64 = 1_024_000_000_000;
/// A pool member dropped as dead is not taken back from DNS for this long: pool names often
/// return the same addresses again.
const DEAD_MEMORY_NS: i64 = 3_600_000_000_000;
/// How many dropped addresses are remembered (a fixed bound, whatever DNS does).
const DEAD_MEMORY_LEN: usize = 64;

/// Polls a source that never answered counts as still starting up (one reach register).
const FIRST_POLLS: u32 = 8;
/// With fewer sources than this to select from, one falseticker cannot be outvoted.
pub const MIN_SOURCES_TO_OUTVOTE: usize = 3;

/// Where the last selection ended, for "why not synchronised".
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum SelectState {
    NotYet,
    NoCandidates,
    NoMajority {
        agreeing: usize,
        candidates: usize,
    },
    /// A majority agrees but the system peer has too few samples for the first step.
    Waiting {
        samples: usize,
    },
    /// The sources agree, but on a correction over the panic threshold: not followed.
    Refused {
        correction_s: f64,
        threshold_s: f64,
        first: bool,
    },
    Selected,
}

#[derive(Clone, Debug)]
struct Entry {
    source: Source,
    /// Index of its configured name in `SyncCore::names`.
    name: usize,
    verdict: Option<Verdict>,
}

/// One configured `[[upstream]]` or `[[pool]]` entry and the state of its DNS lookups.
#[derive(Clone, Debug)]
struct Name {
    config: UpstreamConfig,
    /// An IP address: its source exists from the start and nothing is looked up.
    literal: bool,
    /// A lookup handed out at this time and not answered yet (at most one per name).
    in_flight_since: Option<i64>,
    /// The earliest time of the next lookup, should one be wanted then.
    next_lookup_ns: i64,
    /// The wait after an answer that brought a new address; doubles while answers bring none.
    backoff_ns: i64,
    /// The last lookup's error.
    error: Option<String>,
    /// Why the last answer did not give all the sources wanted, in words.
    note: Option<String>,
}

impl Name {
    /// Sources wanted from this name.
    fn want(&self) -> usize {
        if self.config.pool {
            self.config.max_sources.max(1).into()
        } else {
            1
        }
    }
}

/// A name for the shell to look up, answered through [`SyncCore::resolved`] with `id`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LookupRequest {
    pub id: usize,
    pub host: String,
    pub port: u16,
}

#[derive(Clone, Debug)]
pub struct SyncCore {
    entries: Vec<Entry>,
    names: Vec<Name>,
    /// Pool members dropped as dead or refused, and when.
    dead: VecDeque<(SocketAddr, i64)>,
    discipline: Discipline,
    precision: i8,
    mode: ClockMode,
    system_peer: Option<SocketAddr>,
    select_state: SelectState,
    stray: StrayReport,
    leap: LeapControl,
    panic: Panic,
    /// Sources that were candidates at the last selection.
    selectable: usize,
    /// The raw time the last leap second took effect at.
    last_leap_raw: Option<i64>,
}

impl SyncCore {
    /// A core with the configured names: IP addresses are sources at once, host names wait for
    /// their lookups (see [`SyncCore::lookups`]). With no upstreams configured and a local
    /// stratum, it serves the local clock at once.
    pub fn new(config: &SyncConfig, precision: i8, now_ns: i64) -> SyncCore {
        let mut discipline = Discipline::new(precision, config.max_root_dispersion);
        discipline.makestep = config.makestep;
        if config.upstreams.is_empty()
            && let Some(stratum) = config.local_stratum
        {
            discipline.local(now_ns, stratum);
        }
        let mut core = SyncCore {
            entries: Vec::new(),
            names: Vec::new(),
            dead: VecDeque::new(),
            discipline,
            precision,
            mode: config.mode,
            system_peer: None,
            select_state: SelectState::NotYet,
            stray: StrayReport::default(),
            leap: LeapControl::new(config.leap.clone(), config.mode),
            panic: config.panic,
            selectable: 0,
            last_leap_raw: None,
        };
        for up in &config.upstreams {
            let id = core.add_name(up, now_ns);
            if let Ok(ip) = up.address.parse::<IpAddr>() {
                core.names[id].literal = true;
                core.add_addresses(id, &[SocketAddr::new(ip, up.port)], now_ns);
            }
        }
        core
    }

    fn add_name(&mut self, config: &UpstreamConfig, now_ns: i64) -> usize {
        self.names.push(Name {
            config: config.clone(),
            literal: false,
            in_flight_since: None,
            next_lookup_ns: now_ns,
            backoff_ns: DNS_RETRY_NS,
            error: None,
            note: None,
        });
        self.names.len() - 1
    }

    /// The state to publish now (the initial one, or the last returned).
    pub fn state(&self) -> ClockState {
        self.leap.stamp(*self.discipline.state())
    }

    /// The raw time at which the scheduled leap second takes effect in served time.
    fn leap_at(&self) -> Option<i64> {
        self.leap.scheduled?;
        Some(self.state().leap_at_ns)
    }

    /// When the engine itself moves its samples across the leap: at its instant in software
    /// mode; in system mode once the kernel has stepped ([`SyncCore::kernel_leap`]), or, should
    /// it not, when samples from the far side start to count.
    fn leap_due_at(&self) -> Option<i64> {
        let at = self.leap_at()?;
        Some(match self.mode {
            ClockMode::Software => at,
            ClockMode::System => at.saturating_add(LEAP_CLOSE_NS),
        })
    }

    /// Carries samples and correction across the leap second, once it is due. Returns whether
    /// it did (a state to publish).
    fn leap_if_due(&mut self, now_ns: i64) -> bool {
        if self.leap_due_at().is_none_or(|t| now_ns < t) {
            return false;
        }
        self.apply_leap()
    }

    fn apply_leap(&mut self) -> bool {
        let at = self.leap_at();
        let Some(s) = self.leap.done() else { return false };
        self.last_leap_raw = at;
        let step = s.leap.step_ns();
        self.discipline.shift(step);
        for e in &mut self.entries {
            e.source.filter.shift(nanos_to_secs(step));
        }
        true
    }

    /// Mode system: the kernel clock has just made the scheduled leap (the timeline saw its step),
    /// so samples and correction move with it now. Returns the state to publish, if it was due.
    pub fn kernel_leap(&mut self, _now_ns: i64) -> Option<ClockState> {
        self.apply_leap().then(|| self.state())
    }

    /// Leap seconds applied since start.
    pub fn leaps_applied(&self) -> u32 {
        self.leap.applied
    }

    pub fn sources(&self) -> impl Iterator<Item = &Source> {
        self.entries.iter().map(|e| &e.source)
    }

    pub fn source_mut(&mut self, addr: SocketAddr) -> Option<&mut Source> {
        self.entries
            .iter_mut()
            .find(|e| e.source.addr == addr)
            .map(|e| &mut e.source)
    }

    pub fn select_state(&self) -> SelectState {
        self.select_state
    }

    pub fn has_source(&self, addr: SocketAddr) -> bool {
        self.entries.iter().any(|e| e.source.addr == addr)
    }

    /// Datagrams that were not replies to our requests, by reason.
    pub fn stray(&self) -> StrayReport {
        self.stray
    }

    /// Adds `addr` as a source of `config` (a configured entry, or a new one), within the caps;
    /// returns whether it was added. For callers that resolve names themselves.
    pub fn add_source(&mut self, config: &UpstreamConfig, addr: SocketAddr, now_ns: i64) -> bool {
        let id = match self.names.iter().position(|n| n.config == *config) {
            Some(id) => id,
            None => self.add_name(config, now_ns),
        };
        self.add_addresses(id, &[addr], now_ns) > 0
    }

    /// The name a source at `addr` was configured as and its NTS settings, if it uses NTS.
    pub fn nts_of(&self, addr: SocketAddr) -> Option<(&str, &super::NtsUpstream)> {
        let e = self.entries.iter().find(|e| e.source.addr == addr)?;
        let c = &self.names.get(e.name)?.config;
        Some((c.address.as_str(), c.nts.as_ref()?))
    }

    /// Configured entries that are host names, not addresses: what a resolver must serve.
    pub fn names_to_look_up(&self) -> usize {
        self.names.iter().filter(|n| !n.literal).count()
    }

    fn members(&self, id: usize) -> usize {
        self.entries.iter().filter(|e| e.name == id).count()
    }

    fn recently_dead(&self, addr: SocketAddr, now_ns: i64) -> bool {
        self.dead.iter().any(|&(a, t)| a == addr && now_ns - t < DEAD_MEMORY_NS)
    }

    /// Adds addresses of name `id` in order until it has what it wants: never an address that
    /// is already a source (under any name) or was dropped as dead lately, never beyond
    /// [`MAX_SOURCES`] in total. Notes why the name got fewer than it wants. Returns how many
    /// were added.
    fn add_addresses(&mut self, id: usize, addrs: &[SocketAddr], now_ns: i64) -> usize {
        let want = self.names[id].want();
        let (mut added, mut known, mut dead, mut left_out) = (0, 0, 0, 0);
        for &a in addrs {
            if self.members(id) >= want {
                break;
            }
            if self.has_source(a) {
                known += 1;
            } else if self.recently_dead(a, now_ns) {
                dead += 1;
            } else if self.entries.len() >= MAX_SOURCES {
                left_out += 1;
            } else {
                let config = &self.names[id].config;
                self.entries.push(Entry {
                    source: Source::new(&config.address, a, config, now_ns),
                    name: id,
                    verdict: None,
                });
                added += 1;
            }
        }
        let members = self.members(id);
        self.names[id].note = if left_out > 0 {
            Some(format!(
                "{left_out} address(es) not added: the cap of {MAX_SOURCES} sources in total is reached"
            ))
        } else if members < want && !self.names[id].literal {
            Some(format!(
                "{members} of {want} source(s): the last answer had no other usable address \
                 ({known} already sources, {dead} dropped as dead in the last hour)"
            ))
        } else {
            None
        };
        added
    }

    /// When name `id` is next to be looked up, if it wants sources and may have them.
    fn lookup_due_at(&self, id: usize) -> Option<i64> {
        let n = &self.names[id];
        (!n.literal && n.in_flight_since.is_none() && self.members(id) < n.want() && self.entries.len() < MAX_SOURCES)
            .then_some(n.next_lookup_ns)
    }

    /// Drops pool members that are dead or refused us, then appends to `out` the lookups due
    /// at `now_ns`: a name without its source, a pool short of members. At most one lookup of a
    /// name is in flight; each is answered through [`SyncCore::resolved`].
    pub fn lookups(&mut self, now_ns: i64, out: &mut Vec<LookupRequest>) {
        let mut dropped = Vec::new();
        self.entries.retain(|e| {
            let drop = e.source.should_drop();
            if drop {
                dropped.push(e.source.addr);
            }
            !drop
        });
        for addr in dropped {
            if self.system_peer == Some(addr) {
                self.system_peer = None;
                self.select_state = SelectState::NoCandidates;
            }
            if self.dead.len() >= DEAD_MEMORY_LEN {
                self.dead.pop_front();
            }
            self.dead.push_back((addr, now_ns));
        }
        for id in 0..self.names.len() {
            if self.lookup_due_at(id).is_some_and(|t| t <= now_ns) {
                let n = &mut self.names[id];
                n.in_flight_since = Some(now_ns);
                out.push(LookupRequest {
                    id,
                    host: n.config.address.clone(),
                    port: n.config.port,
                });
            }
        }
    }

    /// The configured name of lookup `id`, for log lines.
    pub fn name_of(&self, id: usize) -> &str {
        self.names.get(id).map_or("?", |n| n.config.address.as_str())
    }

    /// The answer to lookup `id` (addresses in the resolver's order, or the error in words).
    /// An answer to no lookup in flight is ignored.
    pub fn resolved(&mut self, id: usize, result: Result<Vec<SocketAddr>, String>, now_ns: i64) {
        let Some(n) = self.names.get_mut(id) else { return };
        if n.in_flight_since.take().is_none() {
            return;
        }
        match result {
            Err(e) => {
                n.error = Some(e);
                n.next_lookup_ns = now_ns + DNS_RETRY_NS;
            }
            Ok(addrs) => {
                n.error = None;
                let added = self.add_addresses(id, &addrs, now_ns);
                let n = &mut self.names[id];
                n.backoff_ns = if added > 0 {
                    DNS_RETRY_NS
                } else {
                    (n.backoff_ns * 2).min(MAX_LOOKUP_BACKOFF_NS)
                };
                n.next_lookup_ns = now_ns + n.backoff_ns;
            }
        }
    }

    /// The earliest time something is due (a poll, a lookup, the end of a slew, a local
    /// refresh).
    pub fn next_deadline(&self) -> Option<i64> {
        self.entries
            .iter()
            .filter_map(|e| e.source.next_poll_at())
            .chain((0..self.names.len()).filter_map(|id| self.lookup_due_at(id)))
            .chain(self.discipline.deadline())
            .chain(self.leap_due_at())
            .min()
    }

    /// Requests due at `now_ns`, each with fresh random bits from `random` as its transmit
    /// timestamp, appended to `out`.
    pub fn poll(
        &mut self,
        now_ns: i64,
        random: &mut impl FnMut() -> u64,
        out: &mut Vec<(SocketAddr, [u8; HEADER_LEN])>,
    ) {
        for e in &mut self.entries {
            if let Some(req) = e.source.poll(now_ns, random()) {
                out.push((e.source.addr, req));
            }
            // A source that went silent is no longer selected, whatever the last selection said.
            if !e.source.is_reachable() && e.verdict.is_some() {
                e.verdict = None;
                if self.system_peer == Some(e.source.addr) {
                    self.system_peer = None;
                    self.select_state = SelectState::NoCandidates;
                }
            }
        }
    }

    /// A datagram from `from` received at local realtime `t4_ns`. Returns a state to publish
    /// when the clock estimate changed.
    /// Datagrams that are no reply to a request of ours are counted by reason and change nothing;
    /// a short one is not even shown to the source, whose outstanding request it must not end.
    pub fn handle_reply(&mut self, from: SocketAddr, reply: &[u8], t4_ns: i64) -> Option<ClockState> {
        if reply.len() < HEADER_LEN {
            self.stray.too_short += 1;
            return None;
        }
        let precision = self.precision;
        let leapt = self.leap_if_due(t4_ns);
        // An exchange near the leap measures one side of it or the other, or both.
        let keep = self
            .leap_at()
            .or(self.last_leap_raw)
            .is_none_or(|at| (t4_ns - at).abs() > LEAP_CLOSE_NS);
        let Some(e) = self.entries.iter_mut().find(|e| e.source.addr == from) else {
            self.stray.unknown_source += 1;
            return leapt.then(|| self.state());
        };
        let result = e.source.receive_sampling(reply, t4_ns, precision, keep);
        let state = match result {
            Ok(()) if keep => self.reselect(t4_ns),
            _ => None,
        };
        match result {
            Ok(()) => state.or(leapt.then(|| self.state())),
            Err(Rejection::OriginMismatch) => {
                self.stray.wrong_origin += 1;
                leapt.then(|| self.state())
            }
            Err(Rejection::NotExpected) => {
                self.stray.unexpected += 1;
                leapt.then(|| self.state())
            }
            Err(_) => leapt.then(|| self.state()),
        }
    }

    /// The estimated frequency correction without slew, once synchronised (s/s).
    pub fn frequency(&self) -> Option<f64> {
        self.discipline.frequency()
    }

    /// Ends slews and refreshes the local clock; returns a state to publish if one is due.
    pub fn tick(&mut self, now_ns: i64) -> Option<ClockState> {
        let leapt = self.leap_if_due(now_ns);
        let ticked = self.discipline.tick(now_ns).is_some();
        (leapt || ticked).then(|| self.state())
    }

    fn precision_s(&self) -> f64 {
        2f64.powi(self.precision.into())
    }

    fn estimate(&self, e: &Entry, now_ns: i64) -> Option<Estimate> {
        e.source.filter.estimate(now_ns, self.precision_s())
    }

    /// Selection and combine over all fit sources; feeds the discipline on success.
    fn reselect(&mut self, now_ns: i64) -> Option<ClockState> {
        let mut idx = Vec::with_capacity(self.entries.len());
        let mut cands = Vec::with_capacity(self.entries.len());
        let mut ests = Vec::with_capacity(self.entries.len());
        for (i, e) in self.entries.iter().enumerate() {
            let est = self.estimate(e, now_ns);
            let fit = e.source.is_reachable() && est.is_some_and(|x| x.root_distance() <= MAX_DISTANCE);
            let last = e.source.filter.last();
            if let (true, Some(est), Some(last)) = (fit, est, last) {
                idx.push(i);
                ests.push(est);
                cands.push(Candidate {
                    offset: est.offset,
                    frequency: est.frequency,
                    frequency_sigma: est.frequency_sigma,
                    offset_sigma: est.offset_sigma,
                    root_distance: est.root_distance(),
                    jitter: est.jitter,
                    stratum: last.stratum,
                    leap: last.leap,
                    prefer: e.source.prefer,
                    trust: e.source.trust,
                });
            }
        }
        for e in &mut self.entries {
            e.verdict = None;
        }
        self.selectable = cands.len();
        if cands.is_empty() {
            self.select_state = SelectState::NoCandidates;
            return None;
        }
        let current = self
            .system_peer
            .and_then(|p| idx.iter().position(|&i| self.entries[i].source.addr == p));
        let sel = select(&cands, current);
        for (k, v) in sel.verdicts.iter().enumerate() {
            self.entries[idx[k]].verdict = Some(*v);
        }
        let Some(out) = sel.outcome else {
            self.select_state = match self.first_samples(&ests) {
                // At start-up the first samples' intervals often miss each other: that is not
                // yet a disagreement worth the words "no majority".
                Some(samples) => SelectState::Waiting { samples },
                None => SelectState::NoMajority {
                    agreeing: sel.agreeing,
                    candidates: cands.len(),
                },
            };
            return None;
        };
        let peer = &self.entries[idx[out.system_peer]];
        let pe = ests[out.system_peer];
        let pc = cands[out.system_peer];
        if !self.discipline.has_synced() && pe.samples < MIN_SAMPLES_TO_SYNC {
            self.select_state = SelectState::Waiting { samples: pe.samples };
            return None;
        }
        let first = !self.discipline.has_synced();
        let correction_s = out.offset - nanos_to_secs(self.discipline.state().offset_at(now_ns));
        if self.panic.refuses(first, correction_s) {
            self.select_state = SelectState::Refused {
                correction_s,
                threshold_s: self.panic.threshold.unwrap_or(f64::INFINITY),
                first,
            };
            return None;
        }
        self.select_state = SelectState::Selected;
        self.system_peer = Some(peer.source.addr);
        let true_now_ns = now_ns + super::secs_to_nanos(out.offset);
        self.leap.decide(out.leap, true_now_ns);
        let est = SystemEstimate {
            offset: out.offset,
            frequency: out.frequency,
            offset_sigma: out.offset_sigma,
            frequency_sigma: out.frequency_sigma,
            root_delay: pe.root_delay + pe.delay,
            root_dispersion: pe.root_dispersion
                + pe.dispersion
                + (pe.jitter * pe.jitter + out.jitter * out.jitter).sqrt()
                + 3.0 * out.offset_sigma,
            stratum: pc.stratum.saturating_add(1),
            reference_id: RefId::from_upstream(peer.source.addr.ip()),
            leap: out.leap,
        };
        self.discipline.update(now_ns, &est);
        Some(self.state())
    }

    /// Before the first synchronisation, while some source is still polled for its first
    /// samples (a candidate with fewer than the first step needs, or one that has not answered
    /// yet but has not missed many polls either): the fewest samples any source has.
    fn first_samples(&self, candidates: &[Estimate]) -> Option<usize> {
        if self.discipline.has_synced() {
            return None;
        }
        let fewest = candidates.iter().map(|e| e.samples).min().unwrap_or(0);
        let silent = self
            .entries
            .iter()
            .any(|e| e.source.filter.is_empty() && e.source.denied.is_none() && e.source.missed < FIRST_POLLS);
        (fewest < MIN_SAMPLES_TO_SYNC || silent).then_some(if silent { 0 } else { fewest })
    }

    /// Everything `gnomon sources` and `gnomon status` show, as of `now_ns`.
    pub fn report(&self, now_ns: i64) -> SyncReport {
        let stamped = self.state();
        let state = &stamped;
        let correction = nanos_to_secs(state.offset_at(now_ns));
        let mut sources: Vec<SourceReport> = self
            .entries
            .iter()
            .map(|e| {
                let s = &e.source;
                let est = self.estimate(e, now_ns);
                let last = s.filter.last();
                SourceReport {
                    name: s.name.clone(),
                    addr: Some(s.addr),
                    tally: e.verdict.map_or(' ', Verdict::tally),
                    refid: last.map_or_else(String::new, |l| l.reference_id.display(l.stratum)),
                    stratum: last.map_or(0, |l| l.stratum),
                    kind: if s.pool { 'p' } else { 'u' },
                    when_s: s.last_reply_ns.map(|t| ((now_ns - t).max(0) / 1_000_000_000) as u64),
                    poll_log2: s.poll,
                    reach: s.reach,
                    delay_ms: est.map(|x| x.delay * 1e3),
                    // Relative to the time we serve, as ntpq shows offsets to the system clock.
                    offset_ms: est.map(|x| (x.offset - correction) * 1e3),
                    jitter_ms: est.map(|x| x.jitter * 1e3),
                    why: self.why(e, est.as_ref()),
                    // The sync thread's shell fills in what its NTS session is doing.
                    nts: None,
                }
            })
            .collect();
        sources.extend(
            (0..self.names.len())
                .filter_map(|id| self.name_why(id, now_ns).map(|why| (id, why)))
                .map(|(id, why)| {
                    let c = &self.names[id].config;
                    SourceReport {
                        name: c.address.clone(),
                        addr: None,
                        tally: ' ',
                        refid: String::new(),
                        stratum: 0,
                        kind: if c.pool { 'p' } else { 'u' },
                        when_s: None,
                        poll_log2: c.minpoll,
                        reach: 0,
                        delay_ms: None,
                        offset_ms: None,
                        jitter_ms: None,
                        why: Some(why),
                        nts: c.nts.as_ref().map(|_| "NTS, address not resolved yet".to_string()),
                    }
                }),
        );
        let info = state.server_info(now_ns);
        let synced = info.stratum < 16;
        let leap = match info.leap {
            LeapIndicator::NoWarning => "normal",
            LeapIndicator::AddSecond => "insert second",
            LeapIndicator::DeleteSecond => "delete second",
            LeapIndicator::Unsynchronized => "not synchronised",
        };
        let peer = self
            .system_peer
            .filter(|_| self.discipline.has_synced())
            .and_then(|p| self.entries.iter().find(|e| e.source.addr == p))
            .map(|e| match e.source.name == e.source.addr.ip().to_string() {
                true => e.source.addr.to_string(),
                false => format!("{} ({})", e.source.name, e.source.addr),
            });
        let has_local = state.reference_id == RefId::LOCL;
        SyncReport {
            sources,
            stray: self.stray,
            system: SystemReport {
                synced,
                why_unsynced: (!synced).then(|| self.why_unsynced(now_ns)),
                holdover: synced && !has_local && self.select_state != SelectState::Selected,
                stratum: state.stratum,
                // The same text `gnomon query` shows for this server's replies (stratum 0 on the
                // wire when unsynchronised).
                refid: state.reference_id.display(if synced { state.stratum } else { 0 }),
                system_peer: peer,
                offset_s: self.discipline.last_phase,
                correction_s: correction,
                frequency_ppm: state.frequency * 1e6,
                root_delay_s: state.root_delay,
                root_dispersion_s: state.root_dispersion_at(now_ns),
                leap: leap.to_string(),
                last_update_unix_s: self
                    .discipline
                    .has_synced()
                    .then(|| nanos_to_secs(state.reference_time_ns)),
                since_update_s: self
                    .discipline
                    .last_update_ns
                    .or(has_local.then_some(state.base_realtime_ns))
                    .map(|t| nanos_to_secs(now_ns - t)),
                mode: self.mode.name().to_string(),
                kernel_frequency_ppm: 0.0,
                external_steps: 0,
                kernel_event: None,
                leap_note: self.leap.note(state.true_time_ns(now_ns)),
                leaps_applied: self.leap.applied,
                refused: self.refusal(),
                few_sources: self.few_sources(synced && !has_local),
            },
        }
    }

    /// The panic threshold's refusal in words, while it holds.
    fn refusal(&self) -> Option<String> {
        let SelectState::Refused {
            correction_s,
            threshold_s,
            first,
        } = self.select_state
        else {
            return None;
        };
        let years = correction_s / (365.25 * 86_400.0);
        let size = if years.abs() >= 0.1 {
            format!("{correction_s:+.0} s ({years:+.1} years)")
        } else {
            format!("{correction_s:+.3} s")
        };
        let allow = if first {
            "set [makestep] allow_large_first = true if the local clock is known to be that wrong"
        } else {
            "the sources moved after synchronisation; raise [makestep] max_correction to follow them"
        };
        Some(format!(
            "refused: the selected sources want a correction of {size}, over the {threshold_s} s panic threshold ({allow})"
        ))
    }

    /// The warning that a falseticker cannot be outvoted, when it applies.
    fn few_sources(&self, synced: bool) -> Option<String> {
        (synced && self.selectable < MIN_SOURCES_TO_OUTVOTE).then(|| {
            format!(
                "only {} source(s) selectable: with fewer than {MIN_SOURCES_TO_OUTVOTE} a falseticker cannot be outvoted",
                self.selectable
            )
        })
    }

    fn why_unsynced(&self, now_ns: i64) -> String {
        let state = self.discipline.state();
        if self.discipline.has_synced() {
            return format!(
                "holdover limit reached: root dispersion {:.3} s > {:.3} s, no source selected",
                state.root_dispersion_at(now_ns),
                state.max_root_dispersion
            );
        }
        if self.entries.is_empty() {
            if self.names.is_empty() {
                return "no upstream sources configured and no local stratum".to_string();
            }
            if self.names.iter().any(|n| n.in_flight_since.is_some()) {
                return "no source yet: DNS lookup in progress (see gnomon sources --why)".to_string();
            }
            if self.names.iter().any(|n| n.error.is_some()) {
                return "no source: DNS lookups failed (see gnomon sources --why)".to_string();
            }
        }
        match self.select_state {
            SelectState::NotYet => "no valid reply from any source yet".to_string(),
            SelectState::NoCandidates => "no usable source (see gnomon sources --why)".to_string(),
            SelectState::NoMajority { agreeing, candidates } => {
                format!("no majority: at most {agreeing} of {candidates} sources agree, refusing to steer")
            }
            SelectState::Waiting { samples } => {
                format!("waiting for samples ({samples} of {MIN_SAMPLES_TO_SYNC})")
            }
            SelectState::Refused { .. } => self.refusal().unwrap_or_default(),
            SelectState::Selected => "synchronised".to_string(),
        }
    }

    /// The state of name `id`'s lookups in words, when it is worth a line of its own: no source
    /// yet, a lookup in flight or failed, or fewer sources than wanted.
    fn name_why(&self, id: usize, now_ns: i64) -> Option<String> {
        let n = &self.names[id];
        let members = self.members(id);
        let mut parts: Vec<String> = Vec::new();
        if let Some(since) = n.in_flight_since {
            parts.push(format!(
                "DNS lookup in progress ({} s)",
                (now_ns - since).max(0) / 1_000_000_000
            ));
        }
        if let Some(e) = &n.error {
            let retry = (n.next_lookup_ns - now_ns).max(0) / 1_000_000_000;
            if n.in_flight_since.is_some() {
                parts.push(format!("last lookup: DNS failure: {e}"));
            } else {
                parts.push(format!("DNS failure: {e} (next try in {retry} s)"));
            }
        }
        if let Some(note) = &n.note {
            parts.push(note.clone());
        }
        if parts.is_empty() && members == 0 {
            parts.push(if self.entries.len() >= MAX_SOURCES {
                format!("not looked up: the cap of {MAX_SOURCES} sources in total is reached")
            } else {
                "waiting for a DNS lookup".to_string()
            });
        }
        if parts.is_empty() {
            return None;
        }
        if n.config.pool && members > 0 {
            parts.insert(0, format!("pool: {members} of {} members", n.want()));
        }
        Some(parts.join("; "))
    }

    fn why(&self, e: &Entry, est: Option<&Estimate>) -> Option<String> {
        let s = &e.source;
        let mut parts: Vec<String> = Vec::new();
        if let Some(code) = s.denied {
            parts.push(format!("kiss code {} received: not polled any more", code.display(0)));
        } else if s.reach == 0 && s.missed > 0 {
            parts.push(format!("unreachable (no reply to {} polls)", s.missed));
        } else if let Some(r) = s.last_rejection {
            parts.push(match r {
                Rejection::Kiss(RefId::RATE) => format!(
                    "kiss code RATE received: polling slowed to {} s",
                    1u64 << s.poll.clamp(0, 17)
                ),
                r => r.to_string(),
            });
        } else if s.missed > 0 {
            parts.push(format!("no reply to the last {} polls", s.missed));
        }
        if let Some(x) = est
            && x.root_distance() > MAX_DISTANCE
        {
            parts.push(format!(
                "too far (root distance {:.3} s > {MAX_DISTANCE} s)",
                x.root_distance()
            ));
        }
        match e.verdict {
            Some(Verdict::SystemPeer | Verdict::Combined) if self.refusal().is_some() => {
                parts.push(self.refusal().unwrap_or_default());
            }
            Some(Verdict::SystemPeer) if !self.discipline.has_synced() => {
                parts.push(format!(
                    "system peer, waiting for {MIN_SAMPLES_TO_SYNC} samples before the first step"
                ));
            }
            Some(Verdict::SystemPeer) => {}
            Some(Verdict::Combined) => parts.push("candidate: combined, not the system peer".to_string()),
            Some(Verdict::Outlier) => parts.push("not selected (outlier, cluster pruning)".to_string()),
            Some(Verdict::Distant) => parts.push("not combined (root distance over 3x the system peer's)".to_string()),
            Some(Verdict::Falseticker) => parts.push("falseticker (its interval misses the majority's)".to_string()),
            Some(Verdict::NoMajority) => match self.select_state {
                SelectState::NoMajority { agreeing, candidates } => {
                    parts.push(format!("no majority (at most {agreeing} of {candidates} agree)"));
                }
                SelectState::Waiting { samples } => {
                    parts.push(format!("waiting for samples ({samples} of {MIN_SAMPLES_TO_SYNC})"));
                }
                _ => {}
            },
            None if parts.is_empty() && s.filter.is_empty() => parts.push("no valid reply yet".to_string()),
            None if parts.is_empty() => parts.push("not a candidate".to_string()),
            None => {}
        }
        if s.mismatched > 0 {
            parts.push(format!("{} spoofed/mismatched replies", s.mismatched));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str) -> UpstreamConfig {
        let mut u = UpstreamConfig::new(name);
        u.pool = true;
        u
    }

    fn addrs(last: &[u8]) -> Vec<SocketAddr> {
        last.iter().map(|&i| SocketAddr::from(([192, 0, 2, i], 123))).collect()
    }

    fn core(upstreams: Vec<UpstreamConfig>) -> SyncCore {
        let config = SyncConfig {
            upstreams,
            ..SyncConfig::default()
        };
        SyncCore::new(&config, -20, 0)
    }

    fn lookups(core: &mut SyncCore, now: i64) -> Vec<usize> {
        let mut out = Vec::new();
        core.lookups(now, &mut out);
        out.iter().map(|l| l.id).collect()
    }

    /// Polls every due source at `now` and answers each from a server `offset_s` off.
    fn answer_polls(c: &mut SyncCore, now: i64, offsets_s: &[f64]) {
        use crate::proto::{LeapIndicator, NtpShort, NtpTimestamp, ServerInfo, respond};
        let mut out = Vec::new();
        c.poll(now, &mut || now as u64 ^ 0x5555, &mut out);
        for (addr, req) in out {
            let i = usize::from(match addr.ip() {
                std::net::IpAddr::V4(v4) => v4.octets()[3],
                _ => unreachable!(),
            }) - 1;
            let t = |ns: i64| NtpTimestamp::from_unix_nanos((ns + (offsets_s[i] * 1e9) as i64).into());
            let info = ServerInfo {
                leap: LeapIndicator::NoWarning,
                stratum: 1,
                precision: -20,
                root_delay: NtpShort::ZERO,
                root_dispersion: NtpShort::from_seconds_ceil(1e-5),
                reference_id: RefId(*b"GPS\0"),
                reference_timestamp: t(now),
            };
            let reply = respond(&req, &info, t(now + 100_000), t(now + 120_000)).unwrap();
            c.handle_reply(addr, &reply, now + 200_000);
        }
    }

    #[test]
    fn first_samples_that_disagree_say_waiting_not_no_majority() {
        let mut c = core(
            addrs(&[1, 2])
                .iter()
                .map(|a| UpstreamConfig::new(&a.ip().to_string()))
                .collect(),
        );
        let offsets = [1.0, -1.0];
        answer_polls(&mut c, 1_000_000_000, &offsets);
        let r = c.report(1_000_000_000);
        let why = r.system.why_unsynced.unwrap();
        assert!(why.starts_with("waiting for samples"), "{why}");
        let src = r.sources[0].why.clone().unwrap();
        assert!(src.contains("waiting for samples"), "{src}");
        // Once every source has the samples a first step needs, a disagreement is one.
        let mut now = 1_000_000_000;
        for _ in 0..(2 * MIN_SAMPLES_TO_SYNC) {
            now = c.next_deadline().unwrap().max(now + 1);
            answer_polls(&mut c, now, &offsets);
        }
        let why = c.report(now).system.why_unsynced.unwrap();
        assert!(why.starts_with("no majority"), "{why}");
    }

    #[test]
    fn addresses_need_no_lookup_and_names_wait_for_theirs() {
        let mut c = core(vec![
            UpstreamConfig::new("192.0.2.1"),
            pool("192.0.2.2"),
            pool("p.example"),
        ]);
        assert_eq!(c.names_to_look_up(), 1);
        assert_eq!(c.sources().count(), 2);
        assert_eq!(c.next_deadline(), Some(0));
        let r = c.report(0);
        assert_eq!(r.sources.len(), 3, "{:?}", r.sources);
        assert_eq!(r.sources[2].why.as_deref(), Some("waiting for a DNS lookup"));
        assert_eq!(lookups(&mut c, 0), vec![2]);
        assert!(lookups(&mut c, 1).is_empty(), "one lookup in flight per name");
        assert_eq!(
            c.report(3_000_000_000).sources[2].why.as_deref(),
            Some("DNS lookup in progress (3 s)")
        );
        assert!(c.report(0).system.why_unsynced.is_some());
    }

    #[test]
    fn a_failure_is_shown_and_retried_a_minute_later() {
        let mut c = core(vec![UpstreamConfig::new("a.example")]);
        assert_eq!(lookups(&mut c, 0), vec![0]);
        c.resolved(0, Err("timed out".into()), 6);
        let why = c.report(6).sources[0].why.clone().unwrap();
        assert!(why.starts_with("DNS failure: timed out (next try in 60 s)"), "{why}");
        assert_eq!(c.next_deadline(), Some(6 + DNS_RETRY_NS));
        assert!(lookups(&mut c, 5 + DNS_RETRY_NS).is_empty());
        assert_eq!(lookups(&mut c, 6 + DNS_RETRY_NS), vec![0]);
        // An answer nobody waits for (a duplicate) changes nothing.
        c.resolved(0, Ok(addrs(&[1])), 7 + DNS_RETRY_NS);
        c.resolved(0, Ok(addrs(&[2])), 8 + DNS_RETRY_NS);
        assert_eq!(c.sources().map(|s| s.addr).collect::<Vec<_>>(), addrs(&[1]));
        assert!(c.report(8 + DNS_RETRY_NS).sources.iter().all(|s| s.addr.is_some()));
        assert_eq!(
            c.next_deadline(),
            Some(7 + DNS_RETRY_NS + crate::sync::source::INITIAL_DELAY_NS),
            "its first poll, no lookup"
        );
    }

    #[test]
    fn pools_take_no_address_that_is_already_a_source() {
        let mut c = core(vec![pool("a.example"), pool("b.example")]);
        assert_eq!(lookups(&mut c, 0), vec![0, 1]);
        c.resolved(0, Ok(addrs(&[1, 2, 3, 4, 5, 6])), 1);
        c.resolved(1, Ok(addrs(&[3, 4, 5, 6, 7])), 1);
        let got: Vec<SocketAddr> = c.sources().map(|s| s.addr).collect();
        assert_eq!(got, addrs(&[1, 2, 3, 4, 5, 6, 7]));
        let why = c.report(1).sources.last().unwrap().why.clone().unwrap();
        assert!(
            why.starts_with(
                "pool: 3 of 4 members; 3 of 4 source(s): the last answer had no other usable address (2 already sources"
            ),
            "{why}"
        );
        // Short of a member, the pool asks again, later and later while nothing new comes.
        assert!(lookups(&mut c, 1 + DNS_RETRY_NS - 1).is_empty());
        assert_eq!(lookups(&mut c, 1 + DNS_RETRY_NS), vec![1]);
        c.resolved(1, Ok(addrs(&[3, 4])), 2 + DNS_RETRY_NS);
        assert!(lookups(&mut c, 2 + 2 * DNS_RETRY_NS).is_empty());
        assert_eq!(lookups(&mut c, 2 + 3 * DNS_RETRY_NS), vec![1]);
    }
}

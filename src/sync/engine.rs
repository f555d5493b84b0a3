//! The sans-IO sync core: the set of sources, selection after every valid reply, the
//! discipline, and the operator's report. The I/O shell (and the simulation tests) feed it
//! datagrams and times and publish the states it returns.

use super::discipline::{Discipline, MIN_SAMPLES_TO_SYNC, SystemEstimate};
use super::filter::Estimate;
use super::report::{SourceReport, SyncReport, SystemReport};
use super::select::{Candidate, Verdict, select};
use super::source::{Rejection, Source};
use super::{ClockMode, MAX_DISTANCE, SyncConfig, UpstreamConfig, nanos_to_secs};
use crate::clock::ClockState;
use crate::proto::{HEADER_LEN, LeapIndicator, RefId};
use std::net::SocketAddr;

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
    Selected,
}

#[derive(Clone, Debug)]
struct Entry {
    source: Source,
    config: UpstreamConfig,
    verdict: Option<Verdict>,
}

/// A configured name that did not resolve.
#[derive(Clone, Debug)]
struct Unresolved {
    config: UpstreamConfig,
    error: String,
}

#[derive(Clone, Debug)]
pub struct SyncCore {
    entries: Vec<Entry>,
    unresolved: Vec<Unresolved>,
    discipline: Discipline,
    precision: i8,
    mode: ClockMode,
    system_peer: Option<SocketAddr>,
    select_state: SelectState,
    /// Datagrams from addresses that are not sources.
    pub stray: u64,
}

impl SyncCore {
    /// A core with no sources yet (add them with [`SyncCore::add_source`] once resolved).
    /// With no upstreams configured and a local stratum, it serves the local clock at once.
    pub fn new(config: &SyncConfig, precision: i8, now_ns: i64) -> SyncCore {
        let mut discipline = Discipline::new(precision, config.max_root_dispersion);
        discipline.makestep = config.makestep;
        if config.upstreams.is_empty()
            && let Some(stratum) = config.local_stratum
        {
            discipline.local(now_ns, stratum);
        }
        SyncCore {
            entries: Vec::new(),
            unresolved: Vec::new(),
            discipline,
            precision,
            mode: config.mode,
            system_peer: None,
            select_state: SelectState::NotYet,
            stray: 0,
        }
    }

    /// The state to publish now (the initial one, or the last returned).
    pub fn state(&self) -> ClockState {
        *self.discipline.state()
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

    /// Adds a resolved address of `config` (a pool adds one per address) and forgets any DNS
    /// failure recorded for it.
    pub fn add_source(&mut self, config: &UpstreamConfig, addr: SocketAddr, now_ns: i64) {
        self.unresolved.retain(|u| u.config != *config);
        if self.has_source(addr) {
            return;
        }
        self.entries.push(Entry {
            source: Source::new(&config.address, addr, config, now_ns),
            config: config.clone(),
            verdict: None,
        });
    }

    /// Records that `config`'s name did not resolve, for the report.
    pub fn set_unresolved(&mut self, config: &UpstreamConfig, error: String) {
        self.unresolved.retain(|u| u.config != *config);
        self.unresolved.push(Unresolved {
            config: config.clone(),
            error,
        });
    }

    /// Configs whose names still need resolving.
    pub fn unresolved(&self) -> impl Iterator<Item = &UpstreamConfig> {
        self.unresolved.iter().map(|u| &u.config)
    }

    /// Removes pool members that are dead or refused us; returns their pool configs so the
    /// caller re-resolves the names.
    pub fn drop_dead_pool_members(&mut self) -> Vec<UpstreamConfig> {
        let mut pools: Vec<UpstreamConfig> = Vec::new();
        self.entries.retain(|e| {
            if e.source.should_drop() {
                if !pools.contains(&e.config) {
                    pools.push(e.config.clone());
                }
                false
            } else {
                true
            }
        });
        pools
    }

    /// The earliest time something is due (a poll, the end of a slew, a local refresh).
    pub fn next_deadline(&self) -> Option<i64> {
        self.entries
            .iter()
            .filter_map(|e| e.source.next_poll_at())
            .chain(self.discipline.deadline())
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
    pub fn handle_reply(&mut self, from: SocketAddr, reply: &[u8], t4_ns: i64) -> Option<ClockState> {
        let precision = self.precision;
        let Some(e) = self.entries.iter_mut().find(|e| e.source.addr == from) else {
            self.stray += 1;
            return None;
        };
        e.source.receive(reply, t4_ns, precision).ok()?;
        self.reselect(t4_ns)
    }

    /// The estimated frequency correction without slew, once synchronised (s/s).
    pub fn frequency(&self) -> Option<f64> {
        self.discipline.frequency()
    }

    /// Ends slews and refreshes the local clock; returns a state to publish if one is due.
    pub fn tick(&mut self, now_ns: i64) -> Option<ClockState> {
        self.discipline.tick(now_ns)
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
            self.select_state = SelectState::NoMajority {
                agreeing: sel.agreeing,
                candidates: cands.len(),
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
        self.select_state = SelectState::Selected;
        self.system_peer = Some(peer.source.addr);
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
        Some(self.discipline.update(now_ns, &est))
    }

    /// Everything `gnomon sources` and `gnomon status` show, as of `now_ns`.
    pub fn report(&self, now_ns: i64) -> SyncReport {
        let state = self.discipline.state();
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
                    refid: last.map_or_else(String::new, |l| refid_text(l.reference_id, l.stratum)),
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
                }
            })
            .collect();
        sources.extend(self.unresolved.iter().map(|u| SourceReport {
            name: u.config.address.clone(),
            addr: None,
            tally: ' ',
            refid: String::new(),
            stratum: 0,
            kind: if u.config.pool { 'p' } else { 'u' },
            when_s: None,
            poll_log2: u.config.minpoll,
            reach: 0,
            delay_ms: None,
            offset_ms: None,
            jitter_ms: None,
            why: Some(format!("DNS failure: {}", u.error)),
        }));
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
            system: SystemReport {
                synced,
                why_unsynced: (!synced).then(|| self.why_unsynced(now_ns)),
                holdover: synced && !has_local && self.select_state != SelectState::Selected,
                stratum: state.stratum,
                refid: state.reference_id.display(if has_local { 1 } else { state.stratum }),
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
            },
        }
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
        if self.entries.is_empty() && self.unresolved.is_empty() {
            return "no upstream sources configured and no local stratum".to_string();
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
            SelectState::Selected => "synchronised".to_string(),
        }
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
            Some(Verdict::NoMajority) => {
                if let SelectState::NoMajority { agreeing, candidates } = self.select_state {
                    parts.push(format!("no majority (at most {agreeing} of {candidates} agree)"));
                }
            }
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

/// A refid as text: the ASCII code of a stratum-1 server when it is one (chrony's local clock
/// sends 127.127.1.1 instead), else a dotted quad.
fn refid_text(refid: RefId, stratum: u8) -> String {
    if stratum <= 1 && refid.is_ascii_code() {
        refid.display(0)
    } else {
        refid.to_ipv4().to_string()
    }
}

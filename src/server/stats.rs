//! Per-worker counters and latency histograms. The worker counts in plain locals and publishes
//! them a few times a second; readers (the control socket) aggregate, off the hot path.

use hdrhistogram::Histogram;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Everything a worker counts. Drop reasons are the ones after `Answered`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(usize)]
pub enum Counter {
    Received,
    Answered,
    KodDeny,
    KodRate,
    Leaked,
    TooShort,
    Oversized,
    BadVersion,
    BadMode,
    ControlMode,
    Ignored,
    RateLimited,
    SendFailed,
    NoTimestamp,
    Batches,
    RuleServe,
    RuleIgnore,
    RuleDeny,
    RuleLimited,
    RuleExempt,
    RateEvicted,
    SourcePortZero,
    SourceIpv4InIpv6,
    SourceNotUnicast,
    DestinationNotUnicast,
    KernelRxQueue,
    SendEinval,
    SendEperm,
    SendUnreachable,
    SendBufferFull,
    SendOther,
    NtsAnswered,
    NtsNak,
    NtsDropped,
    RuleNtsOnly,
    NotNts,
}

impl Counter {
    pub const COUNT: usize = 36;
    pub const ALL: [Counter; Counter::COUNT] = [
        Counter::Received,
        Counter::Answered,
        Counter::KodDeny,
        Counter::KodRate,
        Counter::Leaked,
        Counter::TooShort,
        Counter::Oversized,
        Counter::BadVersion,
        Counter::BadMode,
        Counter::ControlMode,
        Counter::Ignored,
        Counter::RateLimited,
        Counter::SendFailed,
        Counter::NoTimestamp,
        Counter::Batches,
        Counter::RuleServe,
        Counter::RuleIgnore,
        Counter::RuleDeny,
        Counter::RuleLimited,
        Counter::RuleExempt,
        Counter::RateEvicted,
        Counter::SourcePortZero,
        Counter::SourceIpv4InIpv6,
        Counter::SourceNotUnicast,
        Counter::DestinationNotUnicast,
        Counter::KernelRxQueue,
        Counter::SendEinval,
        Counter::SendEperm,
        Counter::SendUnreachable,
        Counter::SendBufferFull,
        Counter::SendOther,
        Counter::NtsAnswered,
        Counter::NtsNak,
        Counter::NtsDropped,
        Counter::RuleNtsOnly,
        Counter::NotNts,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Received => "received",
            Counter::Answered => "answered",
            Counter::KodDeny => "kod_deny",
            Counter::KodRate => "kod_rate",
            Counter::Leaked => "rate_leaked",
            Counter::TooShort => "drop_too_short",
            Counter::Oversized => "drop_oversized",
            Counter::BadVersion => "drop_bad_version",
            Counter::BadMode => "drop_bad_mode",
            Counter::ControlMode => "drop_control_mode",
            Counter::Ignored => "drop_ignored",
            Counter::RateLimited => "drop_rate_limited",
            Counter::SendFailed => "drop_send_failed",
            Counter::NoTimestamp => "no_kernel_timestamp",
            Counter::Batches => "batches",
            Counter::RuleServe => "rule_serve",
            Counter::RuleIgnore => "rule_ignore",
            Counter::RuleDeny => "rule_deny",
            Counter::RuleLimited => "rule_limited",
            Counter::RuleExempt => "rule_exempt",
            Counter::RateEvicted => "rate_table_evictions",
            Counter::SourcePortZero => "drop_source_port_zero",
            Counter::SourceIpv4InIpv6 => "drop_source_ipv4_in_ipv6",
            Counter::SourceNotUnicast => "drop_source_not_unicast",
            Counter::DestinationNotUnicast => "drop_destination_not_unicast",
            // Datagrams the kernel dropped before we saw them (full receive queue), from
            // SO_RXQ_OVFL; not part of `received`.
            Counter::KernelRxQueue => "drop_kernel_rx_queue",
            // Why sends failed: these add up to drop_send_failed.
            Counter::SendEinval => "send_error_einval",
            Counter::SendEperm => "send_error_eperm",
            Counter::SendUnreachable => "send_error_unreachable",
            Counter::SendBufferFull => "send_error_buffer_full",
            Counter::SendOther => "send_error_other",
            // NTS requests (part of `received`): authenticated replies, NTSN NAKs (unusable
            // cookie or failed authenticator) and drops (broken extension fields).
            Counter::NtsAnswered => "nts_answered",
            Counter::NtsNak => "nts_nak",
            Counter::NtsDropped => "nts_dropped",
            Counter::RuleNtsOnly => "rule_nts_only",
            // Plain requests from a client whose rule is `nts-only`: dropped, never answered.
            Counter::NotNts => "drop_not_nts",
        }
    }

    /// The requests each access-table action matched.
    pub fn from_action(a: crate::policy::Action) -> Counter {
        use crate::policy::Action as A;
        match a {
            A::Serve => Counter::RuleServe,
            A::Ignore => Counter::RuleIgnore,
            A::Deny => Counter::RuleDeny,
            A::Limited => Counter::RuleLimited,
            A::Exempt => Counter::RuleExempt,
            A::NtsOnly => Counter::RuleNtsOnly,
        }
    }

    pub fn from_unanswerable(u: crate::proto::Unanswerable) -> Counter {
        use crate::proto::Unanswerable as U;
        match u {
            U::SourcePortZero => Counter::SourcePortZero,
            U::SourceIpv4InIpv6 => Counter::SourceIpv4InIpv6,
            U::SourceNotUnicast => Counter::SourceNotUnicast,
            U::DestinationNotUnicast => Counter::DestinationNotUnicast,
        }
    }

    /// The reason counter of a failed send (drop_send_failed counts the total).
    pub fn from_send_error(e: super::socket::SendError) -> Counter {
        use super::socket::SendError as E;
        match e {
            E::Invalid => Counter::SendEinval,
            E::NotPermitted => Counter::SendEperm,
            E::Unreachable => Counter::SendUnreachable,
            E::BufferFull => Counter::SendBufferFull,
            E::Other => Counter::SendOther,
        }
    }

    pub fn from_request_error(e: crate::proto::RequestError) -> Counter {
        use crate::proto::RequestError as E;
        match e {
            E::TooShort => Counter::TooShort,
            E::Oversized => Counter::Oversized,
            E::BadVersion => Counter::BadVersion,
            E::BadMode => Counter::BadMode,
            E::ControlMode => Counter::ControlMode,
        }
    }
}

/// Latency histograms cover 1 ns .. 10 s at 3 significant digits.
pub fn new_latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("static bounds are valid")
}

pub fn new_batch_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 65_536, 2).expect("static bounds are valid")
}

/// The published side, shared with readers.
pub struct WorkerStats {
    pub worker: usize,
    pub cpu: Option<usize>,
    pub backend: &'static str,
    counters: [AtomicU64; Counter::COUNT],
    latency: Mutex<Histogram<u64>>,
    batch_sizes: Mutex<Histogram<u64>>,
    /// Publications so far: the worker's heartbeat (it publishes at least every 200 ms while its
    /// loop runs, idle or busy), for the readiness and watchdog checks of the daemon.
    flushes: AtomicU64,
    /// 1 in [`SAMPLE_EVERY`] requests, for `gnomon clients`.
    pub samples: SampleRing,
}

impl WorkerStats {
    pub fn new(worker: usize, cpu: Option<usize>, backend: &'static str) -> WorkerStats {
        WorkerStats {
            worker,
            cpu,
            backend,
            counters: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: Mutex::new(new_latency_histogram()),
            batch_sizes: Mutex::new(new_batch_histogram()),
            flushes: AtomicU64::new(0),
            samples: SampleRing::default(),
        }
    }

    /// How many times the worker has published; 0 until its loop first runs.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.counters[c as usize].load(Ordering::Relaxed)
    }

    pub fn counters(&self) -> [u64; Counter::COUNT] {
        core::array::from_fn(|i| self.counters[i].load(Ordering::Relaxed))
    }

    /// Empties the published histograms (counters are cumulative and stay), so a benchmark can
    /// read the latency of one window.
    pub fn reset_histograms(&self) {
        if let Ok(mut h) = self.latency.lock() {
            h.reset();
        }
        if let Ok(mut h) = self.batch_sizes.lock() {
            h.reset();
        }
    }

    /// Copies of the histograms as published so far (ns of receive-to-transmit, datagrams per batch).
    pub fn histograms(&self) -> (Histogram<u64>, Histogram<u64>) {
        let lat = self
            .latency
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| new_latency_histogram());
        let bat = self
            .batch_sizes
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|_| new_batch_histogram());
        (lat, bat)
    }
}

/// One request in [`SAMPLE_EVERY`] on average goes into its worker's [`SampleRing`]: a countdown
/// per packet, and a random next gap only when it runs out, so no random number per packet.
pub const SAMPLE_EVERY: u32 = 64;
/// Samples a ring holds: the control thread drains it several times a second, so at 64 per
/// sample this covers 16 k requests per drain and worker before the oldest are overwritten.
pub const SAMPLE_SLOTS: usize = 256;

/// What became of a sampled request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Outcome {
    Answered = 0,
    KodDeny = 1,
    KodRate = 2,
    /// Dropped by an `ignore` rule.
    Ignored = 3,
    /// Dropped by the rate limiter.
    RateLimited = 4,
    /// Not a request we answer (length, version, mode) or from an address no reply can reach.
    Invalid = 5,
}

impl Outcome {
    const ALL: [Outcome; 6] = [
        Outcome::Answered,
        Outcome::KodDeny,
        Outcome::KodRate,
        Outcome::Ignored,
        Outcome::RateLimited,
        Outcome::Invalid,
    ];

    pub fn is_drop(self) -> bool {
        matches!(self, Outcome::Ignored | Outcome::RateLimited | Outcome::Invalid)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::KodDeny => "kod_deny",
            Outcome::KodRate => "kod_rate",
            Outcome::Ignored => "ignored",
            Outcome::RateLimited => "rate_limited",
            Outcome::Invalid => "invalid",
        }
    }
}

/// A per-worker ring of sampled (client, outcome) pairs: one writer (the worker, on one request
/// in [`SAMPLE_EVERY`]), one reader (the control thread). No lock: each slot is a seqlock, so
/// the reader skips a slot being overwritten rather than read a torn address.
pub struct SampleRing {
    /// Samples written so far; slot `n % SAMPLE_SLOTS` holds sample `n`.
    head: AtomicU64,
    /// Per slot: `(sample number + 1) << 8 | outcome` once written, 0 while being written, then
    /// the address as 128 bits (IPv4 as mapped IPv6).
    slots: Box<[[AtomicU64; 3]]>,
}

impl Default for SampleRing {
    fn default() -> Self {
        SampleRing {
            head: AtomicU64::new(0),
            slots: (0..SAMPLE_SLOTS).map(|_| Default::default()).collect(),
        }
    }
}

impl SampleRing {
    /// The worker's side (only the worker calls it).
    pub fn push(&self, ip: std::net::IpAddr, outcome: Outcome) {
        let n = self.head.load(Ordering::Relaxed);
        let slot = &self.slots[n as usize % SAMPLE_SLOTS];
        let bits = u128::from(match ip {
            std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            std::net::IpAddr::V6(v6) => v6,
        });
        slot[0].store(0, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        slot[1].store((bits >> 64) as u64, Ordering::Relaxed);
        slot[2].store(bits as u64, Ordering::Relaxed);
        slot[0].store(((n + 1) << 8) | outcome as u64, Ordering::Release);
        self.head.store(n + 1, Ordering::Release);
    }

    /// The reader's side: the samples after number `*next` (those still in the ring), and
    /// `*next` moved past them; returns how many were lost to overwriting.
    pub fn drain(&self, next: &mut u64, mut f: impl FnMut(std::net::IpAddr, Outcome)) -> u64 {
        let head = self.head.load(Ordering::Acquire);
        let from = (*next).max(head.saturating_sub(SAMPLE_SLOTS as u64));
        let lost = from - (*next).min(from);
        for n in from..head {
            let slot = &self.slots[n as usize % SAMPLE_SLOTS];
            let seq = slot[0].load(Ordering::Acquire);
            let bits =
                (u128::from(slot[1].load(Ordering::Relaxed)) << 64) | u128::from(slot[2].load(Ordering::Relaxed));
            std::sync::atomic::fence(Ordering::Acquire);
            if seq >> 8 != n + 1 || slot[0].load(Ordering::Relaxed) != seq {
                continue;
            }
            let Some(&outcome) = Outcome::ALL.get((seq & 0xff) as usize) else {
                continue;
            };
            let v6 = std::net::Ipv6Addr::from(bits);
            let ip = v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4);
            f(ip, outcome);
        }
        *next = head;
        lost
    }
}

/// The worker's own side: plain integers and histograms, published by [`LocalStats::maybe_flush`].
pub struct LocalStats {
    counts: [u64; Counter::COUNT],
    latency: Histogram<u64>,
    batch_sizes: Histogram<u64>,
    last_flush_ns: i64,
}

/// How often a worker publishes its counters and histograms.
const FLUSH_INTERVAL_NS: i64 = 200_000_000;

impl Default for LocalStats {
    fn default() -> Self {
        LocalStats {
            counts: [0; Counter::COUNT],
            latency: new_latency_histogram(),
            batch_sizes: new_batch_histogram(),
            last_flush_ns: 0,
        }
    }
}

impl LocalStats {
    /// Counts a received datagram; false when it was truncated (longer than the buffer), which
    /// is counted as oversized and dropped. Every handler starts here, the echo ceiling too, so
    /// both do the same bookkeeping.
    #[inline]
    pub fn received(&mut self, truncated: bool) -> bool {
        self.counts[Counter::Received as usize] += 1;
        if truncated {
            self.counts[Counter::Oversized as usize] += 1;
        }
        !truncated
    }

    #[inline]
    pub fn add(&mut self, c: Counter, n: u64) {
        self.counts[c as usize] += n;
    }

    /// Counts `n` replies that could not be sent, in the total and by reason.
    pub fn send_failed(&mut self, reason: super::socket::SendError, n: u64) {
        self.add(Counter::SendFailed, n);
        self.add(Counter::from_send_error(reason), n);
    }

    #[inline]
    pub fn record_latency(&mut self, ns: i64) {
        self.latency.saturating_record(ns.max(1) as u64);
    }

    #[inline]
    pub fn record_batch(&mut self, n: usize) {
        self.counts[Counter::Batches as usize] += 1;
        self.batch_sizes.saturating_record(n.max(1) as u64);
    }

    /// Publishes when the interval has passed (or `force`). The histogram merge takes a lock the
    /// reader holds only to clone, and only a few times a second; never per packet.
    pub fn maybe_flush(&mut self, shared: &WorkerStats, now_ns: i64, force: bool) {
        if !force && now_ns - self.last_flush_ns < FLUSH_INTERVAL_NS {
            return;
        }
        self.last_flush_ns = now_ns;
        for (slot, &v) in shared.counters.iter().zip(self.counts.iter()) {
            slot.store(v, Ordering::Relaxed);
        }
        // An idle worker's histograms are empty: adding and resetting them would still walk
        // every bucket (tens of kB) at each flush.
        if !self.latency.is_empty()
            && let Ok(mut h) = shared.latency.try_lock()
        {
            let _ = h.add(&self.latency);
            self.latency.reset();
        }
        if !self.batch_sizes.is_empty()
            && let Ok(mut h) = shared.batch_sizes.try_lock()
        {
            let _ = h.add(&self.batch_sizes);
            self.batch_sizes.reset();
        }
        shared.flushes.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_listed_once_in_order_with_distinct_names() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?}");
        }
        let names: std::collections::BTreeSet<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Counter::COUNT);
    }

    #[test]
    fn a_failed_send_counts_in_the_total_and_by_reason() {
        use super::super::socket::SendError;
        let mut l = LocalStats::default();
        l.send_failed(SendError::Invalid, 2);
        l.send_failed(SendError::Unreachable, 1);
        assert_eq!(l.counts[Counter::SendFailed as usize], 3);
        assert_eq!(l.counts[Counter::SendEinval as usize], 2);
        assert_eq!(l.counts[Counter::SendUnreachable as usize], 1);
    }

    #[test]
    fn sample_ring_hands_each_sample_over_once_and_counts_what_it_lost() {
        let r = SampleRing::default();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) =
            ("192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap());
        r.push(a, Outcome::Answered);
        r.push(b, Outcome::RateLimited);
        let mut next = 0;
        let mut got = Vec::new();
        assert_eq!(r.drain(&mut next, |ip, o| got.push((ip, o))), 0);
        assert_eq!(got, [(a, Outcome::Answered), (b, Outcome::RateLimited)]);
        assert_eq!(r.drain(&mut next, |_, _| panic!("drained twice")), 0);
        for _ in 0..SAMPLE_SLOTS + 10 {
            r.push(a, Outcome::Ignored);
        }
        let mut n = 0;
        assert_eq!(
            r.drain(&mut next, |_, _| n += 1),
            10,
            "overwritten before the reader came"
        );
        assert_eq!(n, SAMPLE_SLOTS);
    }
}

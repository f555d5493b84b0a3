//! Per-client rate limiting (GCRA) in a fixed, preallocated, lock-free table shared by all workers.
//!
//! # Algorithm
//! GCRA, the token bucket written as one timestamp: each client has a theoretical arrival time
//! (TAT). A request at `now` conforms if `max(TAT, now) - now <= tolerance`, where
//! `tolerance = (burst - 1) * interval`; a conforming request advances TAT by `interval`. A
//! non-conforming one changes nothing, so a flood costs one load per packet and no store.
//! An entry whose TAT is in the past says nothing a missing entry would not: that is what lets
//! the table forget clients without losing information.
//!
//! # Why not `governor`
//! `governor` keys its limiters with a growing map (dashmap) or one limiter per key; neither is a
//! fixed-size table whose memory is set by the config and never grows with the number of
//! clients, which a pool server facing millions of (possibly spoofed) addresses needs. The GCRA
//! arithmetic is ten lines; the table around it is what matters, so it is written here.
//!
//! # Table
//! Buckets of 8 slots, one 64-byte cache line each, `table_bytes / 64` of them rounded down to a
//! power of two, allocated and touched once in [`RateLimiter::new`]. A client's key (IPv4
//! address masked to `ipv4_prefix`, IPv6 address masked to `ipv6_prefix`; IPv4-mapped IPv6 counts
//! as IPv4) is hashed with a per-process random seed, so that nobody can aim spoofed addresses at
//! one bucket to evict a victim. The hash picks the bucket and a 16-bit tag. Each slot is one
//! `AtomicU64`:
//!
//! ```text
//!  63      48 47   40 39                             0
//! +----------+-------+--------------------------------+
//! | tag (16) | kod(8)| TAT in 65.536 us units, mod 2^40 |
//! +----------+-------+--------------------------------+
//! ```
//!
//! A new client takes the slot of its bucket with the least remaining TAT: an idle slot if there
//! is one (no loss), else the least loaded client, who is thereby forgiven its debt (reported as
//! [`Checked::evicted`] so the caller can count it). Abusers carry the most debt and so are the
//! last to be evicted. chrony's clientlog does the same with buckets of 16 records and "oldest
//! out"; it grows its table up to a limit, this one is fixed from the start.
//!
//! TAT wraps after 2^40 units (2.28 years). An entry whose TAT lies more than one full burst
//! ahead of `now` cannot have been written by the rule above, so it is read as stale (long idle,
//! or `now` went backwards) and the client starts fresh: neither wrap-around nor a clock jump
//! can lock a client out.
//!
//! # Consistency across workers
//! Every worker updates the same slot with compare-and-swap, so a client's requests are counted
//! once whatever worker receives them. Races tolerated, all failing open or closed by at most
//! one request: the 8 loads of a bucket scan are not one snapshot, so two workers inserting the
//! same new client at once can take two slots (the second ages out unused); a CAS lost more than
//! `CAS_ATTEMPTS` times in a row (one slot hammered by several workers) drops the request;
//! a 16-bit tag match between different clients in one bucket (1 in 65536) shares their state.
//! No counters are kept here: the caller counts [`Checked`] outcomes in its own per-worker
//! counters, so the table sees no writes but the slot updates themselves.
//!
//! # Kiss-o'-Death
//! With `kod`, the first over-limit request in each KoD window (a power-of-two time span of 8 to
//! 16 intervals) is answered with KoD RATE; the 8-bit window number is stored in the slot. Other
//! over-limit requests are leaked (1 in `leak`, chosen with the caller's random number) or
//! dropped. A KoD costs no more bytes than the request, so it is no amplification vector, but
//! unlimited it would still be a 1:1 reflector: the server also puts its DENY answers to refused
//! clients through [`RateLimiter::check_detail`] and drops them over the limit.
#![forbid(unsafe_code)]

use super::access::{canonical, host_mask};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Rate limit settings. `interval` and `burst` are as in chrony's and ntpd's configs, but in
/// seconds rather than log2 seconds.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct RateLimitConfig {
    /// Average seconds between requests allowed per client.
    pub interval: f64,
    /// Requests a client that was idle may send back to back.
    pub burst: u32,
    /// Clients are IPv4 addresses masked to this length (32: each address on its own).
    pub ipv4_prefix: u8,
    /// Clients are IPv6 addresses masked to this length (64: one host owns a whole /64).
    pub ipv6_prefix: u8,
    /// Memory budget of the table; the table uses the largest power of two of 64-byte buckets
    /// that fits (at least one bucket).
    pub table_bytes: usize,
    /// Answer 1 in `leak` over-limit requests anyway (chrony's leak), so that a spoofer cannot cut
    /// a victim off completely. 0 = never.
    pub leak: u32,
    /// Answer over-limit requests with KoD RATE, at most once per client per KoD window.
    pub kod: bool,
}

impl Default for RateLimitConfig {
    /// chrony's `ratelimit` defaults (interval 8 s, burst 8, leak 1 in 4), keyed per /64 for IPv6.
    fn default() -> RateLimitConfig {
        RateLimitConfig {
            interval: 8.0,
            burst: 8,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
            table_bytes: 16 << 20,
            leak: 4,
            kod: false,
        }
    }
}

/// What to do with a request from a `limited` client.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum Limit {
    /// Within the limit: answer.
    Allow = 0,
    /// Over the limit but answered anyway (the leak).
    Leak = 1,
    /// Over the limit: drop.
    Drop = 2,
    /// Over the limit: answer with KoD RATE.
    Kod = 3,
}

impl Limit {
    pub const ALL: [Limit; 4] = [Limit::Allow, Limit::Leak, Limit::Drop, Limit::Kod];

    pub const fn name(self) -> &'static str {
        match self {
            Limit::Allow => "allow",
            Limit::Leak => "leak",
            Limit::Drop => "drop",
            Limit::Kod => "kod",
        }
    }
}

/// A decision plus what the caller should count about it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct Checked {
    pub limit: Limit,
    /// A new client displaced another client's live entry (a collision in a full bucket): that
    /// client's debt was forgiven. A growing rate of these means `table_bytes` is too small.
    pub evicted: bool,
}

/// A client's rate-limit state, read without changing it ([`RateLimiter::peek`]).
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Peek {
    /// The table holds a live entry for the client (it asked within the last burst's time).
    pub tracked: bool,
    /// How far its theoretical arrival time is ahead of now (s): the debt it carries.
    pub backlog_s: f64,
    /// Requests it may send back to back right now and still be answered.
    pub burst_left: u32,
    /// Seconds until its next request conforms again (0 when one would now).
    pub conforms_in_s: f64,
}

/// Slots per bucket: 8 words fill one cache line.
const SLOTS: usize = 8;

#[derive(Default, Debug)]
#[repr(align(64))]
struct Bucket([AtomicU64; SLOTS]);

/// `now_ns >> UNIT_SHIFT` is the time unit of TAT: 65.536 us, fine enough for any sane interval.
const UNIT_SHIFT: u32 = 16;
const TAT_BITS: u32 = 40;
const TAT_MASK: u64 = (1 << TAT_BITS) - 1;
const KOD_SHIFT: u32 = TAT_BITS;
const TAG_SHIFT: u32 = 48;
/// Cap on `interval * burst` in units, so that "more than a burst ahead" stays well inside the
/// wrap-around and stale entries are recognised.
const MAX_AHEAD: u64 = 1 << (TAT_BITS - 2);
/// The KoD window is the first power of two of units at least this many intervals long.
const KOD_INTERVALS: u64 = 8;
/// Lost CAS races on one slot before the request is dropped rather than retried.
const CAS_ATTEMPTS: usize = 4;

/// Fixed-size, lock-free per-client GCRA table (see the module docs). `Send + Sync`: share it
/// between workers with an `Arc`.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: Box<[Bucket]>,
    seed: [u64; 4],
    /// GCRA emission interval, in units.
    emission: u64,
    /// GCRA tolerance `(burst - 1) * emission`, in units.
    tolerance: u64,
    /// Leak when `random < leak_below`; `1 << 32` leaks everything, 0 nothing.
    leak_below: u64,
    kod: bool,
    kod_window_shift: u32,
    v4_mask: u32,
    v6_mask: u128,
}

impl RateLimiter {
    /// A limiter whose bucket hash is seeded from the OS random source (once, here), so that
    /// clients cannot predict which of them share a bucket. Allocates the whole table now.
    pub fn new(cfg: &RateLimitConfig) -> RateLimiter {
        let mut seed = [0u8; 32];
        // Without OS randomness the table still works; it is only easier to aim collisions at.
        let _ = getrandom::fill(&mut seed);
        let word = |i: usize| u64::from_le_bytes(seed[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        RateLimiter::with_seed(cfg, [word(0), word(1), word(2), word(3)])
    }

    /// Deterministic hashing for tests and reproducible benches.
    pub fn with_seed(cfg: &RateLimitConfig, seed: [u64; 4]) -> RateLimiter {
        let n = (cfg.table_bytes / size_of::<Bucket>()).max(1);
        let n = 1usize << n.ilog2();
        let buckets: Box<[Bucket]> = (0..n).map(|_| Bucket::default()).collect();
        // NaN and negative intervals become the smallest one: a validating config rejects them.
        let emission = ((cfg.interval * 1e9) / (1u64 << UNIT_SHIFT) as f64).round() as u64;
        let emission = emission.clamp(1, MAX_AHEAD);
        let tolerance = (emission.saturating_mul(u64::from(cfg.burst.max(1) - 1))).min(MAX_AHEAD - emission);
        let kod_window_shift = (emission * KOD_INTERVALS).next_power_of_two().ilog2();
        RateLimiter {
            buckets,
            seed,
            emission,
            tolerance,
            leak_below: if cfg.leak == 0 {
                0
            } else {
                (1u64 << 32) / u64::from(cfg.leak)
            },
            kod: cfg.kod,
            kod_window_shift,
            v4_mask: !host_mask(32, cfg.ipv4_prefix.min(32)) as u32,
            v6_mask: !host_mask(128, cfg.ipv6_prefix.min(128)),
        }
    }

    /// Bytes of the slot table: fixed at construction, whatever the number of clients.
    pub fn memory_bytes(&self) -> usize {
        size_of_val(&*self.buckets)
    }

    /// The decision for one request. `now_ns` is any monotonic clock in nanoseconds (it may jump
    /// backwards without harm); `random` comes from the caller's PRNG and decides the leak.
    #[inline]
    pub fn check(&self, addr: IpAddr, now_ns: u64, random: u32) -> Limit {
        self.check_detail(addr, now_ns, random).limit
    }

    /// [`RateLimiter::check`], also saying whether a collision evicted another client.
    #[inline]
    pub fn check_detail(&self, addr: IpAddr, now_ns: u64, random: u32) -> Checked {
        let h = self.hash(self.key(addr));
        let tag = h >> TAG_SHIFT;
        let bucket = &self.buckets[h as usize & (self.buckets.len() - 1)].0;
        let now = (now_ns >> UNIT_SHIFT) & TAT_MASK;
        for _ in 0..CAS_ATTEMPTS {
            // Our slot, or else the least loaded one to take over.
            let (mut slot, mut old, mut victim_ahead, mut found) = (0, 0, u64::MAX, None);
            for (i, s) in bucket.iter().enumerate() {
                let w = s.load(Relaxed);
                let a = self.ahead(w, now);
                if w >> TAG_SHIFT == tag {
                    (slot, old, found) = (i, w, Some(a));
                    break;
                }
                if a < victim_ahead {
                    (slot, old, victim_ahead) = (i, w, a);
                }
            }
            // A newcomer starts idle, with no KoD sent.
            let (ahead, kod_window, evicted) = match found {
                Some(a) => (a, (old >> KOD_SHIFT) as u8, false),
                None => (0, 0, victim_ahead > 0),
            };
            let (limit, new) = if ahead <= self.tolerance {
                let tat = (now + ahead + self.emission) & TAT_MASK;
                (
                    Limit::Allow,
                    (tag << TAG_SHIFT) | (u64::from(kod_window) << KOD_SHIFT) | tat,
                )
            } else {
                let window = (now >> self.kod_window_shift) as u8;
                if self.kod && kod_window != window {
                    (
                        Limit::Kod,
                        (old & !(0xff << KOD_SHIFT)) | (u64::from(window) << KOD_SHIFT),
                    )
                } else if u64::from(random) < self.leak_below {
                    return Checked {
                        limit: Limit::Leak,
                        evicted,
                    };
                } else {
                    return Checked {
                        limit: Limit::Drop,
                        evicted,
                    };
                }
            };
            if bucket[slot].compare_exchange(old, new, Relaxed, Relaxed).is_ok() {
                return Checked { limit, evicted };
            }
        }
        Checked {
            limit: Limit::Drop,
            evicted: false,
        }
    }

    /// What the table holds for `addr` at `now_ns`, without changing it (for `gnomon explain`):
    /// a read of one bucket, no store.
    pub fn peek(&self, addr: IpAddr, now_ns: u64) -> Peek {
        let h = self.hash(self.key(addr));
        let tag = h >> TAG_SHIFT;
        let bucket = &self.buckets[h as usize & (self.buckets.len() - 1)].0;
        let now = (now_ns >> UNIT_SHIFT) & TAT_MASK;
        let ahead = bucket
            .iter()
            .map(|s| s.load(Relaxed))
            .find(|w| w >> TAG_SHIFT == tag)
            .map(|w| self.ahead(w, now));
        let unit_s = (1u64 << UNIT_SHIFT) as f64 * 1e-9;
        let a = ahead.unwrap_or(0);
        Peek {
            tracked: ahead.is_some_and(|a| a > 0),
            backlog_s: a as f64 * unit_s,
            burst_left: if a > self.tolerance {
                0
            } else {
                ((self.tolerance - a) / self.emission + 1) as u32
            },
            conforms_in_s: a.saturating_sub(self.tolerance) as f64 * unit_s,
        }
    }

    /// How far a slot's TAT lies ahead of `now`, in units; 0 for idle, empty or stale slots.
    #[inline]
    fn ahead(&self, word: u64, now: u64) -> u64 {
        let d = (word & TAT_MASK).wrapping_sub(now) & TAT_MASK;
        if d > self.tolerance + self.emission { 0 } else { d }
    }

    /// The client a request is accounted to, as 128 bits; IPv4 clients sit in `::ffff:0:0/96`,
    /// where no IPv6 client key can be (mapped addresses were turned into IPv4 first).
    #[inline]
    fn key(&self, addr: IpAddr) -> u128 {
        match canonical(addr) {
            IpAddr::V4(a) => (0xffff << 32) | u128::from(u32::from(a) & self.v4_mask),
            IpAddr::V6(a) => u128::from(a) & self.v6_mask,
        }
    }

    /// Seeded multiply-fold (wyhash's mixing step), twice: fast and well spread; not
    /// cryptographic, but the seed is secret.
    #[inline]
    fn hash(&self, key: u128) -> u64 {
        fn mum(a: u64, b: u64) -> u64 {
            let p = u128::from(a) * u128::from(b);
            (p as u64) ^ ((p >> 64) as u64)
        }
        let h = mum((key as u64) ^ self.seed[0], ((key >> 64) as u64) ^ self.seed[1]);
        mum(h ^ self.seed[2], 0x9e37_79b9_7f4a_7c15 ^ self.seed[3])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const SEC: u64 = 1_000_000_000;
    const SEED: [u64; 4] = [1, 2, 3, 4];

    fn cfg(interval: f64, burst: u32, leak: u32) -> RateLimitConfig {
        RateLimitConfig {
            interval,
            burst,
            leak,
            table_bytes: 1 << 16,
            ..RateLimitConfig::default()
        }
    }

    /// xorshift32: the caller's PRNG in these tests.
    struct Rng(u32);
    impl Rng {
        fn next(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 17;
            self.0 ^= self.0 << 5;
            self.0
        }
    }

    fn v4(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    }

    fn count(limits: impl IntoIterator<Item = Limit>) -> [usize; 4] {
        let mut c = [0; 4];
        for l in limits {
            c[l as usize] += 1;
        }
        c
    }

    #[test]
    fn peek_reads_the_state_and_changes_nothing() {
        let l = RateLimiter::with_seed(&cfg(1.0, 4, 0), SEED);
        let (a, t) = (v4(1), 100 * SEC);
        let fresh = l.peek(a, t);
        assert!(!fresh.tracked);
        assert_eq!((fresh.burst_left, fresh.conforms_in_s), (4, 0.0));
        assert_eq!(l.check(a, t, 0), Limit::Allow);
        assert_eq!(l.check(a, t, 0), Limit::Allow);
        for _ in 0..100 {
            assert_eq!(l.peek(a, t).burst_left, 2, "peeking spends nothing");
        }
        assert!(l.peek(a, t).tracked);
        assert!((l.peek(a, t).backlog_s - 2.0).abs() < 1e-3);
        assert_eq!(count((0..3).map(|_| l.check(a, t, 0))), [2, 0, 1, 0]);
        let over = l.peek(a, t);
        assert_eq!(over.burst_left, 0);
        assert!((over.conforms_in_s - 1.0).abs() < 1e-3, "{over:?}");
        assert_eq!(l.peek(a, t + 10 * SEC).burst_left, 4, "forgiven after idling");
    }

    #[test]
    fn abuser_gets_its_rate_plus_leak() {
        let (burst, leak, intervals) = (8u32, 10u32, 1000u64);
        let rl = RateLimiter::with_seed(&cfg(2.0, burst, leak), SEED);
        let mut rng = Rng(7);
        // Ten requests per interval for `intervals` intervals.
        let sent = intervals * 10;
        let c = count((0..sent).map(|i| rl.check(v4(1), i * 2 * SEC / 10, rng.next())));
        let allowed = c[Limit::Allow as usize] as u64;
        assert!(
            (intervals..=intervals + u64::from(burst)).contains(&allowed),
            "allowed {allowed}"
        );
        let over = sent - allowed;
        let leaked = c[Limit::Leak as usize] as u64;
        let expect = over / u64::from(leak);
        assert!(
            leaked > expect * 8 / 10 && leaked < expect * 12 / 10,
            "leaked {leaked} of {over}"
        );
        assert_eq!(c[Limit::Kod as usize], 0);
        assert_eq!(c[Limit::Drop as usize] as u64, over - leaked);
    }

    #[test]
    fn normal_clients_lose_nothing_beside_an_abuser() {
        let rl = RateLimiter::with_seed(&cfg(1.0, 4, 0), SEED);
        let mut rng = Rng(3);
        let clients = 500u32;
        // Each honest client sends once per interval, at its own phase, with jitter inside a
        // burst; the abuser sends 10 per interval throughout.
        let mut abuser = [0usize; 4];
        for tick in 0..100u64 {
            for c in 0..clients {
                let jitter = u64::from(rng.next() % 1000) * 1_000_000;
                let t = tick * SEC + u64::from(c) * (SEC / u64::from(clients)) / 2 + jitter / 4;
                assert_eq!(
                    rl.check(v4(100 + c), t, rng.next()),
                    Limit::Allow,
                    "client {c} tick {tick}"
                );
            }
            for k in 0..10 {
                abuser[rl.check(v4(1), tick * SEC + k * SEC / 10, rng.next()) as usize] += 1;
            }
        }
        assert!(abuser[Limit::Allow as usize] <= 100 + 4, "{abuser:?}");
        assert!(abuser[Limit::Drop as usize] >= 800, "{abuser:?}");
    }

    #[test]
    fn memory_is_fixed() {
        let c = RateLimitConfig {
            table_bytes: 100_000,
            ..cfg(1.0, 2, 4)
        };
        let rl = RateLimiter::with_seed(&c, SEED);
        // Largest power of two of 64-byte buckets within the budget.
        assert_eq!(rl.memory_bytes(), 65536);
        let mut rng = Rng(1);
        for i in 0..200_000u32 {
            rl.check(IpAddr::V4(Ipv4Addr::from(rng.next())), u64::from(i) * 1000, rng.next());
        }
        assert_eq!(rl.memory_bytes(), 65536);
        let tiny = RateLimiter::with_seed(
            &RateLimitConfig {
                table_bytes: 0,
                ..cfg(1.0, 2, 4)
            },
            SEED,
        );
        assert_eq!(tiny.memory_bytes(), 64);
    }

    #[test]
    fn collisions_evict_the_least_loaded_not_the_abuser() {
        // One bucket of 8 slots shared by an abuser and 50 honest clients.
        let rl = RateLimiter::with_seed(
            &RateLimitConfig {
                table_bytes: 64,
                ..cfg(1.0, 2, 0)
            },
            SEED,
        );
        let mut evictions = 0;
        let mut abuser = [0usize; 4];
        for step in 0..1000u64 {
            let t = step * SEC / 10;
            abuser[rl.check(v4(1), t, 0) as usize] += 1;
            // Ten honest clients per interval, each back every 5 s: more live clients than slots.
            let d = rl.check_detail(v4(1000 + (step % 50) as u32), t, 0);
            assert_eq!(d.limit, Limit::Allow);
            evictions += d.evicted as usize;
        }
        // Honest clients keep displacing each other (each is live for one interval after a
        // request), yet the abuser, always the most loaded, keeps its entry and stays limited.
        assert!(evictions > 0);
        assert!(abuser[Limit::Allow as usize] <= 100 + 2, "{abuser:?}");
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let rl = RateLimiter::with_seed(&cfg(1.0, 3, 0), SEED);
        let mut rng = Rng(99);
        for _ in 0..100_000 {
            let t = u64::from(rng.next()) << (rng.next() % 33);
            rl.check(v4(rng.next() % 16), t, rng.next());
        }
        // After a big jump back, a client is not locked out for the jump's length.
        let a = v4(77);
        let late = 1_000_000 * SEC;
        for k in 0..3 {
            assert_eq!(rl.check(a, late + k, 0), Limit::Allow);
        }
        assert_eq!(rl.check(a, late + 3, 0), Limit::Drop);
        assert_eq!(rl.check(a, SEC, 0), Limit::Allow);
        // And extremes do not overflow.
        rl.check(a, u64::MAX, 0);
        rl.check(a, 0, 0);
    }

    #[test]
    fn kod_is_itself_rate_limited() {
        let c = RateLimitConfig {
            kod: true,
            ..cfg(1.0, 2, 0)
        };
        let rl = RateLimiter::with_seed(&c, SEED);
        let n = count((0..10_000u64).map(|i| rl.check(v4(1), i * SEC / 10, 0)));
        let kods = n[Limit::Kod as usize];
        // One per window of 8..16 intervals over 1000 intervals.
        assert!((1000 / 16..=1000 / 8 + 1).contains(&kods), "{n:?}");
        assert!(n[Limit::Allow as usize] <= 1000 + 2, "{n:?}");
    }

    #[test]
    fn clients_are_keyed_by_prefix() {
        let c = RateLimitConfig {
            ipv4_prefix: 24,
            ipv6_prefix: 64,
            ..cfg(1.0, 1, 0)
        };
        let rl = RateLimiter::with_seed(&c, SEED);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(rl.check(ip("192.0.2.1"), SEC, 0), Limit::Allow);
        assert_eq!(rl.check(ip("192.0.2.200"), SEC, 0), Limit::Drop);
        assert_eq!(rl.check(ip("::ffff:192.0.2.9"), SEC, 0), Limit::Drop);
        assert_eq!(rl.check(ip("192.0.3.1"), SEC, 0), Limit::Allow);
        assert_eq!(rl.check(ip("2001:db8:0:1::1"), SEC, 0), Limit::Allow);
        assert_eq!(rl.check(ip("2001:db8:0:1:ffff::2"), SEC, 0), Limit::Drop);
        assert_eq!(rl.check(ip("2001:db8:0:2::1"), SEC, 0), Limit::Allow);
        // One interval later each has one request again.
        assert_eq!(rl.check(ip("192.0.2.7"), 2 * SEC, 0), Limit::Allow);
        let full = RateLimiter::with_seed(&RateLimitConfig { ipv6_prefix: 128, ..c }, SEED);
        assert_eq!(full.check(IpAddr::V6(Ipv6Addr::from(1u128)), SEC, 0), Limit::Allow);
        assert_eq!(full.check(IpAddr::V6(Ipv6Addr::from(2u128)), SEC, 0), Limit::Allow);
    }

    #[test]
    fn workers_share_one_count() {
        use std::sync::{Arc, Barrier};
        let (burst, steps) = (4usize, 2000u64);
        let rl = Arc::new(RateLimiter::with_seed(&cfg(1.0, burst as u32, 0), SEED));
        let barrier = Arc::new(Barrier::new(2));
        let allowed: usize = (0..2)
            .map(|_| {
                let (rl, barrier) = (Arc::clone(&rl), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    // Both workers get the client's request at each step, at 10x its rate each:
                    // they race on the same slot at the same `now`.
                    (0..steps)
                        .filter(|i| {
                            barrier.wait();
                            rl.check(v4(5), i * SEC / 10, 0) == Limit::Allow
                        })
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        let intervals = (steps / 10) as usize;
        // Counted once across both workers: twice the requests, not twice the allowance.
        assert!(allowed <= intervals + burst + 1, "allowed {allowed}");
        assert!(allowed + 1 >= intervals, "allowed {allowed}");
    }
}

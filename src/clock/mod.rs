//! The published clock snapshot: one writer (the sync thread), lock-free readers (the workers).
//!
//! The snapshot maps a kernel `CLOCK_REALTIME` reading (also the timescale of kernel receive
//! timestamps) to true time and carries everything a reply says about the server's clock.
//! It is a seqlock over atomics, so reading it costs a few loads and never blocks the writer.

use crate::proto::{LeapIndicator, NtpShort, NtpTimestamp, RefId, ServerInfo};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::{SystemTime, UNIX_EPOCH};

/// Root dispersion grows at least this fast between updates (RFC 5905 PHI, 15 ppm).
pub const PHI: f64 = 15e-6;

/// Everything the workers need from the clock, valid from `base_realtime_ns` on.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct ClockState {
    /// Bumped by the publisher on every update.
    pub generation: u64,
    /// The kernel realtime reading at which `offset_ns` and `root_dispersion` hold.
    pub base_realtime_ns: i64,
    /// true time - kernel realtime, at the base instant.
    pub offset_ns: i64,
    /// Rate of change of the offset (s/s): the frequency correction plus any slew in progress.
    pub frequency: f64,
    pub leap: LeapIndicator,
    /// 1..=15, or 16 when unsynchronised.
    pub stratum: u8,
    pub precision: i8,
    pub reference_id: RefId,
    /// True time of the last clock update, as Unix nanoseconds (the reply's reference timestamp).
    pub reference_time_ns: i64,
    /// Seconds.
    pub root_delay: f64,
    /// Seconds, at the base instant.
    pub root_dispersion: f64,
    /// Growth of root dispersion per second after the base (at least [`PHI`]).
    pub dispersion_rate: f64,
    /// Once root dispersion passes this many seconds (holdover ran out), replies say LI 3.
    pub max_root_dispersion: f64,
    /// The realtime at which a leap second takes effect (`i64::MAX`: none due). From then on
    /// replies say LI 0 and true time moves by `leap_step_ns`.
    pub leap_at_ns: i64,
    /// -1 s for an inserted second (23:59:59 repeats), +1 s for a deleted one; 0 where the
    /// kernel clock steps itself (mode system).
    pub leap_step_ns: i64,
}

impl ClockState {
    /// The state before anything is known: unsynchronised, no correction.
    pub fn unsynchronized(precision: i8) -> ClockState {
        ClockState {
            generation: 0,
            base_realtime_ns: 0,
            offset_ns: 0,
            frequency: 0.0,
            leap: LeapIndicator::Unsynchronized,
            stratum: 16,
            precision,
            reference_id: RefId::INIT,
            reference_time_ns: 0,
            root_delay: 0.0,
            root_dispersion: 0.0,
            dispersion_rate: PHI,
            max_root_dispersion: f64::INFINITY,
            leap_at_ns: i64::MAX,
            leap_step_ns: 0,
        }
    }

    /// The LOCAL clock: the kernel clock itself, claimed at `stratum` with refid LOCL, no
    /// correction, reference time `now_ns` (the "LOCAL clock" of ntpd tutorials).
    pub fn local(stratum: u8, precision: i8, now_ns: i64) -> ClockState {
        ClockState {
            base_realtime_ns: now_ns,
            leap: LeapIndicator::NoWarning,
            stratum: stratum.clamp(1, 15),
            reference_id: RefId::LOCL,
            reference_time_ns: now_ns,
            ..ClockState::unsynchronized(precision)
        }
    }

    pub fn is_synchronized(&self) -> bool {
        self.leap != LeapIndicator::Unsynchronized && self.stratum < 16
    }

    /// The correction (true - realtime) at a realtime reading, in nanoseconds.
    #[inline]
    pub fn offset_at(&self, realtime_ns: i64) -> i64 {
        let elapsed = realtime_ns.wrapping_sub(self.base_realtime_ns) as f64;
        self.offset_ns + (elapsed * self.frequency) as i64
    }

    /// True time for a kernel realtime reading, as Unix nanoseconds.
    #[inline]
    pub fn true_time_ns(&self, realtime_ns: i64) -> i64 {
        let leap = if realtime_ns >= self.leap_at_ns {
            self.leap_step_ns
        } else {
            0
        };
        realtime_ns + self.offset_at(realtime_ns) + leap
    }

    #[inline]
    pub fn ntp_time(&self, realtime_ns: i64) -> NtpTimestamp {
        NtpTimestamp::from_unix_nanos(self.true_time_ns(realtime_ns) as i128)
    }

    /// Root dispersion in seconds at a realtime reading: it grows with time since the update.
    #[inline]
    pub fn root_dispersion_at(&self, realtime_ns: i64) -> f64 {
        let elapsed = (realtime_ns.wrapping_sub(self.base_realtime_ns) as f64 * 1e-9).max(0.0);
        self.root_dispersion + elapsed * self.dispersion_rate
    }

    /// What replies say about the server at this instant (computed once per batch).
    pub fn server_info(&self, realtime_ns: i64) -> ServerInfo {
        let dispersion = self.root_dispersion_at(realtime_ns);
        if !self.is_synchronized() || dispersion > self.max_root_dispersion {
            return ServerInfo::unsynchronized(self.precision);
        }
        ServerInfo {
            leap: if realtime_ns >= self.leap_at_ns {
                LeapIndicator::NoWarning
            } else {
                self.leap
            },
            stratum: self.stratum,
            precision: self.precision,
            root_delay: NtpShort::from_seconds_ceil(self.root_delay),
            root_dispersion: NtpShort::from_seconds_ceil(dispersion),
            reference_id: self.reference_id,
            reference_timestamp: NtpTimestamp::from_unix_nanos(self.reference_time_ns as i128),
        }
    }

    fn to_words(self) -> [u64; WORDS] {
        [
            self.generation,
            self.base_realtime_ns as u64,
            self.offset_ns as u64,
            self.frequency.to_bits(),
            u64::from(self.leap as u8) | u64::from(self.stratum) << 8 | u64::from(self.precision as u8) << 16,
            u64::from(u32::from_be_bytes(self.reference_id.0)),
            self.reference_time_ns as u64,
            self.root_delay.to_bits(),
            self.root_dispersion.to_bits(),
            self.dispersion_rate.to_bits(),
            self.max_root_dispersion.to_bits(),
            self.leap_at_ns as u64,
            self.leap_step_ns as u64,
        ]
    }

    fn from_words(w: [u64; WORDS]) -> ClockState {
        ClockState {
            generation: w[0],
            base_realtime_ns: w[1] as i64,
            offset_ns: w[2] as i64,
            frequency: f64::from_bits(w[3]),
            leap: LeapIndicator::from_bits(w[4] as u8),
            stratum: (w[4] >> 8) as u8,
            precision: (w[4] >> 16) as u8 as i8,
            reference_id: RefId((w[5] as u32).to_be_bytes()),
            reference_time_ns: w[6] as i64,
            root_delay: f64::from_bits(w[7]),
            root_dispersion: f64::from_bits(w[8]),
            dispersion_rate: f64::from_bits(w[9]),
            max_root_dispersion: f64::from_bits(w[10]),
            leap_at_ns: w[11] as i64,
            leap_step_ns: w[12] as i64,
        }
    }
}

const WORDS: usize = 13;

/// The seqlock cell. Only [`ClockPublisher`] writes it.
struct Cell {
    sequence: AtomicU64,
    words: [AtomicU64; WORDS],
}

/// The single writer. Not `Clone`, so there is exactly one.
pub struct ClockPublisher {
    cell: Arc<Cell>,
    generation: u64,
}

/// A reader handle; clone one per worker.
#[derive(Clone)]
pub struct ClockReader {
    cell: Arc<Cell>,
}

/// A new snapshot cell holding `initial`, with its writer and a reader.
pub fn snapshot(initial: ClockState) -> (ClockPublisher, ClockReader) {
    let words = initial.to_words().map(AtomicU64::new);
    let cell = Arc::new(Cell {
        sequence: AtomicU64::new(0),
        words,
    });
    (
        ClockPublisher {
            cell: cell.clone(),
            generation: initial.generation,
        },
        ClockReader { cell },
    )
}

impl ClockPublisher {
    /// Publishes a new state; its generation is set here.
    pub fn publish(&mut self, mut state: ClockState) {
        self.generation += 1;
        state.generation = self.generation;
        let seq = self.cell.sequence.load(Ordering::Relaxed);
        // Odd sequence: readers that see it, or see it change, retry.
        self.cell.sequence.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        for (slot, w) in self.cell.words.iter().zip(state.to_words()) {
            slot.store(w, Ordering::Relaxed);
        }
        self.cell.sequence.store(seq.wrapping_add(2), Ordering::Release);
    }

    pub fn reader(&self) -> ClockReader {
        ClockReader {
            cell: self.cell.clone(),
        }
    }

    /// What was last published.
    pub fn current(&self) -> ClockState {
        self.reader().load()
    }
}

impl ClockReader {
    /// A consistent copy of the current state. Never blocks; retries only while an update
    /// is being written (a few hundred nanoseconds, a few times a minute).
    #[inline]
    pub fn load(&self) -> ClockState {
        loop {
            let s1 = self.cell.sequence.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let words = core::array::from_fn(|i| self.cell.words[i].load(Ordering::Relaxed));
            fence(Ordering::Acquire);
            if self.cell.sequence.load(Ordering::Relaxed) == s1 {
                return ClockState::from_words(words);
            }
        }
    }
}

/// The kernel's CLOCK_REALTIME as Unix nanoseconds (a vDSO read, no syscall).
#[inline]
pub fn realtime_ns() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

/// Reads of one unchanged clock value after which [`precision_of`] gives up. Far more than a
/// ticking clock ever needs (a 4 ms jiffy clock changes within ~200k reads of 20 ns), but a clock
/// that only moves when the process waits (clknetsim's) would otherwise hang the start.
const MAX_SAME_READS: u32 = 1 << 20;

/// Assumed when the clock did not tick while it was read: about 1 us, what most servers report.
pub const FALLBACK_PRECISION: i8 = -20;

/// log2 of the time it takes to read the clock, rounded up (RFC 5905 precision), measured; `None`
/// when the clock did not change in [`MAX_SAME_READS`] reads.
pub fn precision_of(mut read_ns: impl FnMut() -> i64) -> Option<i8> {
    let mut best = i64::MAX;
    for _ in 0..64 {
        let a = read_ns();
        let mut b = read_ns();
        let mut same = 0;
        while b == a {
            same += 1;
            if same >= MAX_SAME_READS {
                return None;
            }
            b = read_ns();
        }
        best = best.min(b - a);
    }
    let secs = best.max(1) as f64 * 1e-9;
    Some((secs.log2().ceil() as i8).clamp(-30, 0))
}

/// [`precision_of`] the kernel's CLOCK_REALTIME.
pub fn measure_precision() -> Option<i8> {
    precision_of(realtime_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synced() -> ClockState {
        ClockState {
            base_realtime_ns: 1_000_000_000_000,
            offset_ns: 5_000,
            frequency: 1e-6,
            leap: LeapIndicator::NoWarning,
            stratum: 2,
            reference_id: RefId([10, 0, 0, 1]),
            reference_time_ns: 999_000_000_000,
            root_delay: 0.01,
            root_dispersion: 0.001,
            max_root_dispersion: 1.0,
            ..ClockState::unsynchronized(-20)
        }
    }

    #[test]
    fn words_round_trip() {
        let s = synced();
        assert_eq!(ClockState::from_words(s.to_words()), s);
        let u = ClockState::unsynchronized(-7);
        assert_eq!(ClockState::from_words(u.to_words()), u);
    }

    #[test]
    fn correction_and_dispersion_grow_with_time() {
        let s = synced();
        assert_eq!(s.true_time_ns(s.base_realtime_ns), s.base_realtime_ns + 5_000);
        // one second later: +1 us from frequency
        assert_eq!(s.offset_at(s.base_realtime_ns + 1_000_000_000), 6_000);
        let d = s.root_dispersion_at(s.base_realtime_ns + 1_000_000_000);
        assert!((d - (0.001 + PHI)).abs() < 1e-12);
    }

    #[test]
    fn a_leap_second_steps_served_time_and_clears_li_at_its_instant() {
        let at = 1_000_500_000_000;
        let s = ClockState {
            leap: LeapIndicator::AddSecond,
            leap_at_ns: at,
            leap_step_ns: -1_000_000_000,
            ..synced()
        };
        assert_eq!(ClockState::from_words(s.to_words()), s);
        assert_eq!(s.server_info(at - 1).leap, LeapIndicator::AddSecond);
        assert_eq!(s.server_info(at).leap, LeapIndicator::NoWarning);
        let (before, after) = (s.true_time_ns(at - 1), s.true_time_ns(at));
        assert!(
            (after - before + 1_000_000_000).abs() <= 2,
            "23:59:59 again: {}",
            after - before
        );
        // Mode system: the kernel steps; the snapshot only clears LI.
        let k = ClockState { leap_step_ns: 0, ..s };
        assert!((k.true_time_ns(at) - k.true_time_ns(at - 1)).abs() <= 2);
        assert_eq!(k.server_info(at).leap, LeapIndicator::NoWarning);
    }

    #[test]
    fn holdover_limit_makes_replies_unsynchronized() {
        let s = synced();
        assert_eq!(s.server_info(s.base_realtime_ns).stratum, 2);
        // 0.001 + 15e-6 * t > 1.0 after about 66600 s
        let late = s.base_realtime_ns + 70_000 * 1_000_000_000;
        assert_eq!(s.server_info(late).leap, LeapIndicator::Unsynchronized);
    }

    #[test]
    fn publish_and_read() {
        let (mut p, r) = snapshot(ClockState::unsynchronized(-20));
        assert_eq!(r.load().generation, 0);
        p.publish(synced());
        let got = r.load();
        assert_eq!(got.generation, 1);
        assert_eq!(got.stratum, 2);
    }

    #[test]
    fn readers_never_see_a_torn_state() {
        let (mut p, r) = snapshot(ClockState::unsynchronized(-20));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Loads that overlapped publishing, by the slowest reader: on a busy 2-core machine a
        // reader may not be scheduled before a fixed number of publishes is over.
        let overlapped = Arc::new([
            std::sync::atomic::AtomicU64::new(0),
            std::sync::atomic::AtomicU64::new(0),
        ]);
        let readers: Vec<_> = (0..2)
            .map(|k| {
                let r = r.clone();
                let stop = stop.clone();
                let overlapped = overlapped.clone();
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let s = r.load();
                        // Every published state has offset == base, so a mix would show.
                        assert_eq!(s.offset_ns, s.base_realtime_ns);
                        assert_eq!(s.reference_time_ns, s.base_realtime_ns);
                        n += 1;
                        overlapped[k].store(n, Ordering::Relaxed);
                    }
                    n
                })
            })
            .collect();
        let started = std::time::Instant::now();
        let mut i = 1i64;
        // At least 200k publishes, and on until both readers loaded 10k times meanwhile (or 20 s).
        while i < 200_000
            || (overlapped.iter().any(|n| n.load(Ordering::Relaxed) < 10_000)
                && started.elapsed() < std::time::Duration::from_secs(20))
        {
            p.publish(ClockState {
                base_realtime_ns: i,
                offset_ns: i,
                reference_time_ns: i,
                ..synced()
            });
            i += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for h in readers {
            assert!(h.join().unwrap() > 0);
        }
    }

    #[test]
    fn precision_is_plausible() {
        let p = measure_precision().expect("the real clock ticks");
        assert!((-30..=-10).contains(&p), "precision {p}");
    }

    #[test]
    fn precision_of_a_clock_that_never_ticks_gives_up() {
        assert_eq!(precision_of(|| 42), None);
        // A clock that moves 1 ms every 1000 reads: coarse, but it ticks.
        let mut n = 0i64;
        let p = precision_of(|| {
            n += 1;
            n / 1000 * 1_000_000
        });
        assert_eq!(p, Some(-9));
    }
}

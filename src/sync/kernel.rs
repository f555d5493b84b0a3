//! The kernel clock beside the sync engine: maps the engine's timeline to CLOCK_REALTIME,
//! steers the kernel clock in mode `system`, and notices another program stepping it.
//!
//! # One free-running timeline
//! The engine measures and disciplines a "raw" clock: CLOCK_REALTIME as it would run if nobody
//! but its start-up frequency setting touched it. The kernel clock is that plus what has been
//! applied to it since: `kernel = raw + applied(raw)`, with `applied` piecewise linear and known
//! exactly, because this module makes every change (or detects it). Two things follow:
//! - **System mode has no feedback loop.** Steering the kernel clock does not disturb the
//!   samples the filters hold, as it would if they measured the steered clock (chrony corrects
//!   every stored sample when it slews; here nothing needs correcting). The kernel is steered
//!   toward the served time by exact bookkeeping, and the snapshot the workers read carries the
//!   difference still to go, so served time is right and continuous from the first update while
//!   the kernel catches up at a bounded rate.
//! - **An external step costs nothing but a short window.** Steps (settimeofday, clock_settime,
//!   ADJ_SETOFFSET) move CLOCK_REALTIME but not CLOCK_BOOTTIME, so a change in their difference
//!   is a step by someone. (Not CLOCK_MONOTONIC: it stops during suspend, which CLOCK_REALTIME
//!   does not, so a resumed machine would look stepped by its sleep.) It is folded into
//!   `applied`: the raw timeline and every sample stay valid, and the next snapshot takes the
//!   step back out of served time. Until then (at most one sync-loop wake-up, 100 ms) replies
//!   are off by the step; the status says when it happened.
//!
//! Slews by another program (adjtime, ADJ_OFFSET) move both clocks alike and cannot be told from
//! oscillator wander that way; a changed kernel frequency setting is reported instead.

use super::MakeStep;
use super::report::SystemReport;
use crate::clock::ClockState;
use crate::proto::{LeapIndicator, RefId};
use core::fmt;
use std::io;

/// Largest frequency adjustment of `timex.freq` alone (s/s): the kernel's MAXFREQ, 500 ppm.
pub const KERNEL_MAX_FREQ_FIELD: f64 = 500e-6;
/// The kernel's unit of frequency adjustment (`timex.freq`), in s/s: 2^-16 ppm.
pub const KERNEL_FREQUENCY_UNIT: f64 = 1e-6 / 65536.0;
/// Largest frequency adjustment (s/s) with the tick: the kernel takes `timex.tick` within 10%
/// of its nominal value (as chrony, which uses it to cope with clocks 5000 ppm off and to
/// slew at 83333 ppm), and `timex.freq` for what the tick's 1/tick steps do not reach.
pub const KERNEL_MAX_FREQUENCY: f64 = 0.1;
/// Extra rate used to remove a residual, on top of the frequency correction: chrony's
/// `maxslewrate` default (1/12). Served time does not slew with it: the snapshot keeps it right
/// while the kernel clock catches up.
pub const KERNEL_SLEW: f64 = 1.0 / 12.0;
/// Shortest kernel slew: small residuals are spread over this long.
pub const MIN_KERNEL_SLEW_NS: i64 = 8_000_000_000;
/// Residuals smaller than this are left alone (they are below what the estimate can tell).
const NEGLIGIBLE_RESIDUAL_NS: i64 = 100;
/// A change of CLOCK_REALTIME - CLOCK_BOOTTIME larger than this is a step. Reading both clocks
/// takes well under a microsecond; a preempted read is retried by [`ClockReading`]'s producer.
pub const STEP_DETECT_NS: i64 = 1_000_000;
/// Kernel frequency settings further apart than this (s/s) were changed by someone else; the
/// kernel's unit is 2^-16 ppm, so rounding never comes close.
const FREQUENCY_CHANGED: f64 = 1e-9;

/// A frequency adjustment (s/s) as the kernel takes it: `(tick, freq)`, the tick in
/// microseconds per jiffy of nominal length `base_tick` and freq in [`KERNEL_FREQUENCY_UNIT`]s.
/// The tick carries the whole microseconds, freq the rest (under one tick step, 1/`base_tick`).
pub fn split_frequency(frequency: f64, base_tick: i64) -> (i64, i64) {
    let f = frequency.clamp(-KERNEL_MAX_FREQUENCY, KERNEL_MAX_FREQUENCY);
    let limit = base_tick / 10;
    let tick = ((f * base_tick as f64).round() as i64).clamp(-limit, limit);
    let rest = (f - tick as f64 / base_tick as f64).clamp(-KERNEL_MAX_FREQ_FIELD, KERNEL_MAX_FREQ_FIELD);
    (base_tick + tick, (rest / KERNEL_FREQUENCY_UNIT).round() as i64)
}

/// The frequency adjustment (s/s) of a kernel `(tick, freq)` pair: the two add up.
pub fn combined_frequency(tick: i64, freq: i64, base_tick: i64) -> f64 {
    (tick - base_tick) as f64 / base_tick as f64 + freq as f64 * KERNEL_FREQUENCY_UNIT
}

/// CLOCK_REALTIME and CLOCK_BOOTTIME read together.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ClockReading {
    pub realtime_ns: i64,
    pub boottime_ns: i64,
}

/// What the sync thread can do to the kernel clock. The real one is `adjtimex`
/// (`super::adjtimex::LinuxClock`); tests and simulations use [`SimulatedKernel`].
pub trait KernelClock {
    fn read(&mut self) -> ClockReading;
    /// The frequency adjustment in force (s/s; positive makes the clock run faster).
    fn frequency(&mut self) -> io::Result<f64>;
    /// Sets the frequency adjustment; returns what the kernel took (after its limit and unit).
    fn set_frequency(&mut self, frequency: f64) -> io::Result<f64>;
    /// Steps CLOCK_REALTIME by `delta_ns`.
    fn step(&mut self, delta_ns: i64) -> io::Result<()>;
    /// Tells the kernel whether time is synchronised and how good it is (seconds), which other
    /// programs read and which lets the kernel copy the time to the RTC.
    fn set_sync_status(&mut self, synced: bool, max_error: f64, est_error: f64) -> io::Result<()>;
    /// Arms the kernel's own leap second for the coming midnight (STA_INS for LI 1, STA_DEL for
    /// LI 2), or disarms it (LI 0). The kernel then steps CLOCK_REALTIME itself at 23:59:60.
    fn set_leap(&mut self, leap: LeapIndicator) -> io::Result<()>;
    /// Before the first change: cancels phase corrections another program left running in the
    /// kernel (a PLL offset, an adjtime() slew), which would move the clock behind gnomon's back.
    fn take_over(&mut self) -> io::Result<()>;
}

/// Something the operator should know about the kernel clock.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum KernelEvent {
    /// CLOCK_REALTIME jumped by `delta_ns` without gnomon doing it.
    ExternalStep { raw_ns: i64, delta_ns: i64 },
    /// The kernel frequency setting is not what it was left at.
    FrequencyChanged { raw_ns: i64, from: f64, to: f64 },
    /// gnomon stepped the kernel clock (mode system, within `makestep`).
    Stepped { raw_ns: i64, delta_ns: i64 },
    /// An adjtimex call failed (mode system); the snapshot keeps served time right regardless.
    Failed { raw_ns: i64, errno: i32 },
    /// The kernel made the leap second it was told to (mode system): an expected step.
    Leap { raw_ns: i64, delta_ns: i64 },
}

impl fmt::Display for KernelEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            KernelEvent::ExternalStep { delta_ns, .. } => write!(
                f,
                "kernel clock stepped by {:+.6} s by another program (compensated)",
                delta_ns as f64 * 1e-9
            ),
            KernelEvent::FrequencyChanged { from, to, .. } => write!(
                f,
                "kernel frequency changed by another program: {:+.3} ppm -> {:+.3} ppm",
                from * 1e6,
                to * 1e6
            ),
            KernelEvent::Stepped { delta_ns, .. } => {
                write!(f, "stepped the kernel clock by {:+.6} s", delta_ns as f64 * 1e-9)
            }
            KernelEvent::Leap { delta_ns, .. } => write!(
                f,
                "the kernel clock made the leap second as scheduled (stepped {:+.6} s)",
                delta_ns as f64 * 1e-9
            ),
            KernelEvent::Failed { errno, .. } => write!(
                f,
                "adjtimex failed: {} (served time stays right; the kernel clock is not steered)",
                io::Error::from_raw_os_error(errno)
            ),
        }
    }
}

/// The raw timeline, what has been applied to the kernel clock, and the steering.
#[derive(Clone, Debug)]
pub struct Timeline {
    system: bool,
    /// `applied(raw) = applied_base + slope * (raw - raw_base)`.
    raw_base: i64,
    applied_base: i64,
    slope: f64,
    /// The kernel frequency setting found at start: the raw clock runs at it.
    start_frequency: f64,
    /// The setting last seen or made, to notice others changing it.
    frequency_setting: f64,
    /// CLOCK_REALTIME - CLOCK_BOOTTIME at the last reading.
    gap: i64,
    raw_now: i64,
    slew_end: Option<i64>,
    /// The kernel has been put on the served time once.
    engaged: bool,
    /// When the kernel clock may be stepped rather than slewed (counted in clock updates).
    pub makestep: MakeStep,
    /// Clock updates steered toward so far, and the reference time of the last one.
    updates: u32,
    last_reference_ns: Option<i64>,
    /// Time is synchronised as last told to the kernel.
    told_synced: Option<bool>,
    pub last_event: Option<KernelEvent>,
    pub external_steps: u32,
    /// The leap flag last given to the kernel.
    told_leap: Option<LeapIndicator>,
    /// The kernel's leap step expected: (raw time, step).
    expected_leap: Option<(i64, i64)>,
    /// The kernel made the expected leap since [`Timeline::take_kernel_leap`] was last asked.
    kernel_leapt: bool,
}

/// A step this close to the expected leap (in time and size) is the kernel's leap second.
const LEAP_MATCH_NS: i64 = 1_000_000;
const LEAP_WINDOW_NS: i64 = super::leap::LEAP_CLOSE_NS;

impl Timeline {
    /// `frequency`: the kernel's setting now. In system mode nothing is changed until the first
    /// synchronised state arrives.
    pub fn new(system: bool, reading: ClockReading, frequency: f64) -> Timeline {
        Timeline {
            system,
            raw_base: reading.realtime_ns,
            applied_base: 0,
            slope: 0.0,
            start_frequency: frequency,
            frequency_setting: frequency,
            gap: reading.realtime_ns - reading.boottime_ns,
            raw_now: reading.realtime_ns,
            slew_end: None,
            engaged: false,
            makestep: MakeStep::DEFAULT,
            updates: 0,
            last_reference_ns: None,
            told_synced: None,
            last_event: None,
            external_steps: 0,
            told_leap: None,
            expected_leap: None,
            kernel_leapt: false,
        }
    }

    /// Whether the kernel made the scheduled leap second since the last call: the engine must
    /// then move its samples too ([`super::SyncCore::kernel_leap`]).
    pub fn take_kernel_leap(&mut self) -> bool {
        std::mem::take(&mut self.kernel_leapt)
    }

    /// What has been applied to the kernel clock at raw time `raw_ns`.
    pub fn applied_at(&self, raw_ns: i64) -> i64 {
        self.applied_base + (self.slope * (raw_ns - self.raw_base) as f64).round() as i64
    }

    pub fn kernel_of_raw(&self, raw_ns: i64) -> i64 {
        raw_ns + self.applied_at(raw_ns)
    }

    pub fn raw_of_kernel(&self, kernel_ns: i64) -> i64 {
        let kernel_base = self.raw_base + self.applied_base;
        self.raw_base + ((kernel_ns - kernel_base) as f64 / (1.0 + self.slope)).round() as i64
    }

    /// The raw time of the last [`Timeline::observe`].
    pub fn raw_now(&self) -> i64 {
        self.raw_now
    }

    /// Takes a reading of both clocks; returns the raw time now, and whether `applied` changed
    /// (someone stepped the kernel clock), in which case the snapshot must be republished.
    pub fn observe(&mut self, reading: ClockReading) -> (i64, bool) {
        let gap = reading.realtime_ns - reading.boottime_ns;
        let delta = gap - self.gap;
        self.gap = gap;
        let mut changed = false;
        if delta.abs() > STEP_DETECT_NS {
            // The step happened between the readings; put it at the later one.
            let raw = self.raw_of_kernel(reading.realtime_ns - delta);
            self.rebase(raw);
            self.applied_base += delta;
            let leap = self
                .expected_leap
                .is_some_and(|(at, step)| (delta - step).abs() <= LEAP_MATCH_NS && (raw - at).abs() <= LEAP_WINDOW_NS);
            if leap {
                // Served time follows the kernel through it: the engine moves by the same second.
                self.expected_leap = None;
                self.kernel_leapt = true;
                self.last_event = Some(KernelEvent::Leap {
                    raw_ns: raw,
                    delta_ns: delta,
                });
            } else {
                self.external_steps += 1;
                self.last_event = Some(KernelEvent::ExternalStep {
                    raw_ns: raw,
                    delta_ns: delta,
                });
            }
            changed = true;
        }
        self.raw_now = self.raw_of_kernel(reading.realtime_ns);
        (self.raw_now, changed)
    }

    /// Compares the kernel's frequency setting with the one last seen or made; true when someone
    /// else changed it. Once steering, call [`Timeline::steer`] then to put it back: until that
    /// call, `applied` runs at the wrong rate, which the next samples see as a phase error.
    pub fn check_frequency(&mut self, frequency: f64) -> bool {
        if (frequency - self.frequency_setting).abs() <= FREQUENCY_CHANGED {
            return false;
        }
        self.last_event = Some(KernelEvent::FrequencyChanged {
            raw_ns: self.raw_now,
            from: self.frequency_setting,
            to: frequency,
        });
        self.frequency_setting = frequency;
        if !self.engaged {
            // Not steering: the raw clock now runs at the new rate, which the filters will see
            // as wander.
            self.start_frequency = frequency;
        }
        true
    }

    /// Starts a new linear piece of `applied` at `raw`, continuous with the old one.
    fn rebase(&mut self, raw: i64) {
        self.applied_base = self.applied_at(raw);
        self.raw_base = raw;
    }

    /// The discipline's state (on the raw timeline) as the workers need it: a correction of the
    /// kernel clock. Anchored where both pieces are linear; continuous whenever `state` is.
    pub fn snapshot(&self, state: &ClockState) -> ClockState {
        if self.applied_base == 0 && self.slope == 0.0 {
            return *state;
        }
        let anchor = state.base_realtime_ns.max(self.raw_base);
        ClockState {
            base_realtime_ns: self.kernel_of_raw(anchor),
            offset_ns: state.offset_at(anchor) - self.applied_at(anchor),
            // d(offset)/d(kernel) = (d correction - d applied) / d raw * d raw / d kernel.
            frequency: (state.frequency - self.slope) / (1.0 + self.slope),
            root_dispersion: state.root_dispersion_at(anchor),
            leap_at_ns: match state.leap_at_ns {
                i64::MAX => i64::MAX,
                at => self.kernel_of_raw(at),
            },
            ..*state
        }
    }

    /// When [`Timeline::steer`] has something to do without a new state: the end of a slew.
    pub fn deadline(&self) -> Option<i64> {
        self.slew_end
    }

    /// System mode: moves the kernel clock toward the served time of `state` (raw timeline).
    /// Call with every new state and at [`Timeline::deadline`]. Returns whether `applied`
    /// changed (the snapshot must be republished). Does nothing in software mode, or before the
    /// first synchronised state.
    pub fn steer<K: KernelClock + ?Sized>(&mut self, kernel: &mut K, state: &ClockState, raw_now: i64) -> bool {
        // The local clock as reference is the kernel clock itself: nothing to steer toward.
        if !self.system || (!self.engaged && !state.is_synchronized()) || state.reference_id == RefId::LOCL {
            return false;
        }
        let result = self.steer_inner(kernel, state, raw_now);
        if let Err(e) = result {
            // Retry once a second, not at every wake-up of the sync loop (a due deadline).
            self.slew_end = self.slew_end.map(|end| end.max(raw_now.saturating_add(1_000_000_000)));
            self.last_event = Some(KernelEvent::Failed {
                raw_ns: raw_now,
                errno: e.raw_os_error().unwrap_or(0),
            });
        }
        true
    }

    fn steer_inner<K: KernelClock + ?Sized>(
        &mut self,
        kernel: &mut K,
        state: &ClockState,
        raw_now: i64,
    ) -> io::Result<()> {
        if !self.engaged {
            kernel.take_over()?;
        }
        self.rebase(raw_now);
        // Each clock update carries a new reference time; steering again toward the same one
        // (at the end of a slew) is not a new update.
        let update = self.last_reference_ns != Some(state.reference_time_ns);
        if update {
            self.last_reference_ns = Some(state.reference_time_ns);
            self.updates = self.updates.saturating_add(1);
        }
        let mut residual = state.offset_at(raw_now) - self.applied_base;
        // Only a clock update may step: a step by someone else between updates is slewed back.
        if update && self.makestep.allows(self.updates, residual as f64 * 1e-9) {
            kernel.step(residual)?;
            self.applied_base += residual;
            self.gap += residual;
            self.last_event = Some(KernelEvent::Stepped {
                raw_ns: raw_now,
                delta_ns: residual,
            });
            residual = 0;
        }
        self.engaged = true;
        let (slew, end) = if residual.abs() < NEGLIGIBLE_RESIDUAL_NS {
            (0.0, None)
        } else {
            // Saturating: an external step of weeks takes longer than i64 nanoseconds can count.
            let duration = ((residual.unsigned_abs() as f64 / KERNEL_SLEW) as i64).max(MIN_KERNEL_SLEW_NS);
            (
                residual as f64 / duration as f64,
                Some(raw_now.saturating_add(duration)),
            )
        };
        let took = self.set_rate(kernel, state.frequency + slew)?;
        self.slope = (1.0 + took) / (1.0 + self.start_frequency) - 1.0;
        self.slew_end = end;
        let synced = state.is_synchronized();
        if self.told_synced != Some(synced) || synced {
            // The kernel clock's own error: served time's, plus what it has yet to slew (the RTC
            // is set from it, and other programs trust it).
            let dispersion = state.root_dispersion_at(raw_now) + residual.abs() as f64 * 1e-9;
            kernel.set_sync_status(synced, state.root_delay / 2.0 + dispersion, dispersion)?;
            self.told_synced = Some(synced);
        }
        let leap = match state.leap_at_ns {
            i64::MAX => LeapIndicator::NoWarning,
            _ => state.leap,
        };
        self.expected_leap = match leap {
            LeapIndicator::AddSecond => Some((state.leap_at_ns, -1_000_000_000)),
            LeapIndicator::DeleteSecond => Some((state.leap_at_ns, 1_000_000_000)),
            _ => None,
        };
        if self.told_leap != Some(leap) {
            kernel.set_leap(leap)?;
            self.told_leap = Some(leap);
        }
        Ok(())
    }

    /// Sets the kernel frequency so that the kernel clock runs at `rate` (s/s) against the raw
    /// clock; returns the setting the kernel took.
    fn set_rate<K: KernelClock + ?Sized>(&mut self, kernel: &mut K, rate: f64) -> io::Result<f64> {
        // The kernel's rate is (1 + start)(1 + rate) against true seconds where the raw clock's
        // is (1 + start): the product, not the sum, or the rate is off by start * rate.
        let want = (1.0 + self.start_frequency) * (1.0 + rate) - 1.0;
        self.frequency_setting = kernel.set_frequency(want.clamp(-KERNEL_MAX_FREQUENCY, KERNEL_MAX_FREQUENCY))?;
        Ok(self.frequency_setting)
    }

    /// On stopping (system mode): leaves the kernel at the estimated frequency `frequency` of
    /// the raw clock's correction, without any slew in progress, so that the clock keeps good
    /// time while gnomon is not running instead of drifting at a slew's rate.
    pub fn release<K: KernelClock + ?Sized>(&mut self, kernel: &mut K, frequency: Option<f64>) -> io::Result<()> {
        let Some(frequency) = frequency.filter(|_| self.system && self.engaged) else {
            return Ok(());
        };
        // Nobody is left to clear it after the leap, or to withdraw it.
        if self.told_leap.is_some_and(|l| l != LeapIndicator::NoWarning) {
            kernel.set_leap(LeapIndicator::NoWarning)?;
            self.told_leap = Some(LeapIndicator::NoWarning);
        }
        self.set_rate(kernel, frequency)?;
        self.slew_end = None;
        Ok(())
    }

    /// Fills the kernel lines of a report made at raw time `raw_ns` for `state`.
    pub fn fill_report(&self, system: &mut SystemReport, state: &ClockState, raw_ns: i64) {
        system.correction_s = self.residual(state, raw_ns) as f64 * 1e-9;
        system.kernel_frequency_ppm = self.frequency_setting * 1e6;
        system.external_steps = self.external_steps;
        system.kernel_event = self.last_event.map(|e| {
            let at = match e {
                KernelEvent::ExternalStep { raw_ns, .. }
                | KernelEvent::FrequencyChanged { raw_ns, .. }
                | KernelEvent::Stepped { raw_ns, .. }
                | KernelEvent::Leap { raw_ns, .. }
                | KernelEvent::Failed { raw_ns, .. } => raw_ns,
            };
            format!("{e}, {} s ago", (raw_ns - at).max(0) / 1_000_000_000)
        });
    }

    /// The kernel's frequency setting as gnomon left it (s/s).
    pub fn frequency_setting(&self) -> f64 {
        self.frequency_setting
    }

    /// Served time minus kernel clock at raw time `raw_ns` for `state`: what the snapshot
    /// still corrects (near zero once the kernel is steered).
    pub fn residual(&self, state: &ClockState, raw_ns: i64) -> i64 {
        state.offset_at(raw_ns) - self.applied_at(raw_ns)
    }
}

/// The simulated kernel's nominal tick: USER_HZ 100.
const SIMULATED_BASE_TICK: i64 = 10_000;

/// A kernel clock in a simulation: CLOCK_REALTIME as a function of a driving "oscillator" time
/// the test advances, with frequency settings and steps applied exactly as the kernel would.
#[derive(Clone, Debug)]
pub struct SimulatedKernel {
    /// The oscillator: what CLOCK_REALTIME would read with a zero frequency setting and no
    /// steps. Set by the test before each call.
    pub oscillator_ns: i64,
    /// `realtime = oscillator + adjust`, `adjust` linear from (osc_base, adjust_base).
    osc_base: i64,
    adjust_base: i64,
    frequency: f64,
    steps: i64,
    pub synced: bool,
    pub max_error: f64,
    pub calls: u32,
    /// The armed leap second: (realtime it happens at, step).
    leap: Option<(i64, i64)>,
    /// Leap seconds made.
    pub leaps: u32,
}

impl SimulatedKernel {
    pub fn new(oscillator_ns: i64, frequency: f64) -> SimulatedKernel {
        SimulatedKernel {
            oscillator_ns,
            osc_base: oscillator_ns,
            adjust_base: 0,
            frequency,
            steps: 0,
            synced: false,
            max_error: 16.0,
            calls: 0,
            leap: None,
            leaps: 0,
        }
    }

    /// Makes an armed leap second whose instant has come, as the kernel does at 23:59:60.
    fn settle(&mut self) {
        if let Some((at, step)) = self.leap
            && self.realtime_at(self.oscillator_ns) >= at
        {
            self.external_step(step);
            self.leap = None;
            self.leaps += 1;
        }
    }

    fn adjust_at(&self, osc: i64) -> i64 {
        self.adjust_base + (self.frequency * (osc - self.osc_base) as f64).round() as i64
    }

    /// CLOCK_REALTIME at oscillator time `osc`.
    pub fn realtime_at(&self, osc: i64) -> i64 {
        osc + self.adjust_at(osc)
    }

    /// What another program would do: step the clock without telling gnomon.
    pub fn external_step(&mut self, delta_ns: i64) {
        self.adjust_base += delta_ns;
        self.steps += delta_ns;
    }
}

impl KernelClock for SimulatedKernel {
    fn read(&mut self) -> ClockReading {
        self.settle();
        let realtime_ns = self.realtime_at(self.oscillator_ns);
        ClockReading {
            realtime_ns,
            boottime_ns: realtime_ns - self.steps,
        }
    }

    fn frequency(&mut self) -> io::Result<f64> {
        Ok(self.frequency)
    }

    fn set_frequency(&mut self, frequency: f64) -> io::Result<f64> {
        self.calls += 1;
        let osc = self.oscillator_ns;
        self.adjust_base = self.adjust_at(osc);
        self.osc_base = osc;
        let (tick, freq) = split_frequency(frequency, SIMULATED_BASE_TICK);
        self.frequency = combined_frequency(tick, freq, SIMULATED_BASE_TICK);
        Ok(self.frequency)
    }

    fn step(&mut self, delta_ns: i64) -> io::Result<()> {
        self.calls += 1;
        self.external_step(delta_ns);
        Ok(())
    }

    fn set_sync_status(&mut self, synced: bool, max_error: f64, _est_error: f64) -> io::Result<()> {
        self.synced = synced;
        self.max_error = max_error;
        Ok(())
    }

    fn take_over(&mut self) -> io::Result<()> {
        self.calls += 1;
        Ok(())
    }

    fn set_leap(&mut self, leap: LeapIndicator) -> io::Result<()> {
        const DAY: i64 = 86_400_000_000_000;
        let midnight = (self.realtime_at(self.oscillator_ns).div_euclid(DAY) + 1) * DAY;
        self.leap = match leap {
            LeapIndicator::AddSecond => Some((midnight, -1_000_000_000)),
            LeapIndicator::DeleteSecond => Some((midnight - 1_000_000_000, 1_000_000_000)),
            _ => None,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::LeapIndicator;

    const O0: i64 = 1_700_000_000_000_000_000;
    const S: i64 = 1_000_000_000;

    fn synced(base: i64, offset_ns: i64, frequency: f64) -> ClockState {
        ClockState {
            base_realtime_ns: base,
            offset_ns,
            frequency,
            leap: LeapIndicator::NoWarning,
            stratum: 2,
            reference_id: RefId([10, 0, 0, 1]),
            reference_time_ns: base + offset_ns,
            root_delay: 0.001,
            root_dispersion: 0.0005,
            max_root_dispersion: 1.0,
            ..ClockState::unsynchronized(-20)
        }
    }

    /// Runs the sync thread's part for `seconds` in 100 ms steps; checks at every step that the
    /// raw timeline runs with the oscillator and that served time through the snapshot is what
    /// the state says. Returns the largest |served - kernel| seen in the last second.
    fn run(tl: &mut Timeline, k: &mut SimulatedKernel, state: &ClockState, start_frequency: f64, seconds: i64) -> i64 {
        let mut last = 0;
        for i in 0..seconds * 10 {
            k.oscillator_ns += 100_000_000;
            let (raw, _) = tl.observe(k.read());
            let want_raw = k.oscillator_ns + (start_frequency * (k.oscillator_ns - O0) as f64).round() as i64;
            assert!((raw - want_raw).abs() <= 2, "raw {raw} vs {want_raw}");
            if tl.deadline().is_some_and(|d| d <= raw) {
                tl.steer(k, state, raw);
            }
            let kernel_now = k.realtime_at(k.oscillator_ns);
            let served = tl.snapshot(state).true_time_ns(kernel_now);
            let want = raw + state.offset_at(raw);
            assert!((served - want).abs() <= 4, "served {served} vs {want} at step {i}");
            if i >= (seconds - 1) * 10 {
                last = last.max((served - kernel_now).abs());
            }
        }
        last
    }

    #[test]
    fn software_mode_is_the_identity_until_someone_steps_the_clock() {
        let mut k = SimulatedKernel::new(O0, 12e-6);
        let mut tl = Timeline::new(false, k.read(), 12e-6);
        let state = synced(tl.raw_now(), 30_000_000, -50e-6);
        assert_eq!(tl.snapshot(&state), state);
        assert!(!tl.steer(&mut k, &state, tl.raw_now()), "software mode never steers");
        // The largest correction in the last second is at 9.1 s: 30 ms - 9.1 s * 50 ppm.
        let largest = run(&mut tl, &mut k, &state, 12e-6, 10);
        assert!((largest - 29_545_000).abs() < 10, "{largest}");
        // Someone steps the kernel clock 5 s forward: served time and the raw timeline carry on.
        k.external_step(5 * S);
        assert!(tl.observe(k.read()).1, "the step is noticed");
        assert_eq!(tl.external_steps, 1);
        assert!(matches!(tl.last_event, Some(KernelEvent::ExternalStep { delta_ns, .. }) if delta_ns == 5 * S));
        run(&mut tl, &mut k, &state, 12e-6, 10);
        // ...and a frequency change by someone else is reported.
        k.set_frequency(40e-6).unwrap();
        assert!(tl.check_frequency(k.frequency().unwrap()));
        assert!(matches!(tl.last_event, Some(KernelEvent::FrequencyChanged { .. })));
        assert_eq!(k.calls, 1, "only the test touched the kernel");
    }

    #[test]
    fn system_mode_slews_the_kernel_onto_served_time() {
        let start_frequency = 30e-6;
        let mut k = SimulatedKernel::new(O0, start_frequency);
        let mut tl = Timeline::new(true, k.read(), start_frequency);
        // Unsynchronised states leave the kernel alone.
        let unsynced = ClockState::unsynchronized(-20);
        assert!(!tl.steer(&mut k, &unsynced, tl.raw_now()));
        assert_eq!(k.calls, 0);
        // 50 ms off and 100 ppm fast: below the step threshold, so slewed.
        let state = synced(tl.raw_now(), 50_000_000, -100e-6);
        assert!(tl.steer(&mut k, &state, tl.raw_now()));
        assert!(k.synced, "the kernel is told it is synchronised");
        assert!(
            k.max_error > 0.05,
            "...with an error bound that counts the 50 ms still to slew"
        );
        let frequency = k.frequency().unwrap();
        assert!(
            frequency <= KERNEL_MAX_FREQUENCY && frequency > 100e-6,
            "slewing forward: {frequency}"
        );
        // 50 ms at 400 ppm takes 125 s; after that the kernel is on served time.
        let left = run(&mut tl, &mut k, &state, start_frequency, 200);
        assert!(left < 1_000, "kernel still {left} ns off served time");
        // Then it runs at the corrected rate: (1 + start)(1 - 100 ppm) - 1.
        let rate = (1.0 + start_frequency) * (1.0 - 100e-6) - 1.0;
        assert!(
            (k.frequency().unwrap() - rate).abs() < 1e-10,
            "{}",
            k.frequency().unwrap()
        );
        assert_eq!(tl.external_steps, 0, "its own slews are not mistaken for steps");
        assert_eq!(tl.deadline(), None);
        assert!(
            !tl.check_frequency(k.frequency().unwrap()),
            "its own setting is not a change"
        );
        // Another program resets the frequency: reported, and put back at the next steer.
        k.set_frequency(0.0).unwrap();
        assert!(tl.check_frequency(k.frequency().unwrap()));
        assert!(matches!(tl.last_event, Some(KernelEvent::FrequencyChanged { to, .. }) if to == 0.0));
        tl.steer(&mut k, &state, tl.raw_now());
        assert!(
            (k.frequency().unwrap() - rate).abs() < 1e-10,
            "{}",
            k.frequency().unwrap()
        );
        assert!(k.max_error < 0.01, "once on served time, the bound is served time's");
        // Stopping in the middle of a slew leaves the estimated rate, not the slew's.
        let ahead = synced(tl.raw_now(), state.offset_at(tl.raw_now()) + 10_000_000, -100e-6);
        tl.steer(&mut k, &ahead, tl.raw_now());
        assert!((k.frequency().unwrap() - rate).abs() > 100e-6, "slewing");
        tl.release(&mut k, Some(-100e-6)).unwrap();
        assert!(
            (k.frequency().unwrap() - rate).abs() < 1e-10,
            "{}",
            k.frequency().unwrap()
        );
    }

    #[test]
    fn system_mode_steps_only_large_errors_within_makestep() {
        let mut k = SimulatedKernel::new(O0, 0.0);
        let mut tl = Timeline::new(true, k.read(), 0.0);
        tl.makestep = MakeStep {
            threshold: 1.0,
            limit: Some(2),
        };
        let state = synced(tl.raw_now(), -3 * S, 0.0);
        tl.steer(&mut k, &state, tl.raw_now());
        assert!(matches!(tl.last_event, Some(KernelEvent::Stepped { delta_ns, .. }) if delta_ns == -3 * S));
        assert!(run(&mut tl, &mut k, &state, 0.0, 2) < 10);
        assert_eq!(tl.external_steps, 0, "its own step is not reported as someone else's");
        // The second update is within the limit: stepped.
        k.oscillator_ns += S;
        let (raw, _) = tl.observe(k.read());
        let second = synced(raw, -5 * S, 0.0);
        tl.steer(&mut k, &second, raw);
        assert!(matches!(tl.last_event, Some(KernelEvent::Stepped { delta_ns, .. }) if delta_ns == -2 * S));
        // Later errors, however large, are slewed: served time is right meanwhile.
        k.oscillator_ns += S;
        let (raw, _) = tl.observe(k.read());
        let later = synced(raw, -15 * S, 0.0);
        tl.steer(&mut k, &later, raw);
        assert!(
            matches!(tl.last_event, Some(KernelEvent::Stepped { delta_ns, .. }) if delta_ns == -2 * S),
            "no third step: {:?}",
            tl.last_event
        );
        let left = run(&mut tl, &mut k, &later, 0.0, 10);
        assert!(left > 5 * S, "10 s cannot be slewed in 10 s: {left}");
    }

    #[test]
    fn kernel_frequency_uses_the_tick_beyond_500_ppm() {
        for f in [-0.05, -5e-3, -123.456e-6, 0.0, 42e-6, 5e-3, 0.0833] {
            let (tick, freq) = split_frequency(f, 10_000);
            assert!((9_000..=11_000).contains(&tick), "{f}: tick {tick}");
            assert!(
                freq.abs() as f64 * KERNEL_FREQUENCY_UNIT <= KERNEL_MAX_FREQ_FIELD,
                "{f}: freq {freq}"
            );
            let back = combined_frequency(tick, freq, 10_000);
            assert!((back - f).abs() <= KERNEL_FREQUENCY_UNIT, "{f} -> {back}");
        }
        // Beyond the tick's 10%: clamped, not wrapped.
        assert_eq!(split_frequency(0.5, 10_000).0, 11_000);
        let mut k = SimulatedKernel::new(O0, 0.0);
        assert!((k.set_frequency(-5e-3).unwrap() + 5e-3).abs() < 1e-9);
    }

    /// A VM restored from an old snapshot, its clock then set weeks ahead by an agent: slewing
    /// that back takes longer than i64 nanoseconds count; the end of the slew saturates.
    #[test]
    fn an_external_step_of_weeks_keeps_a_deadline_ahead() {
        let mut k = SimulatedKernel::new(O0, 0.0);
        let mut tl = Timeline::new(true, k.read(), 0.0);
        let state = synced(tl.raw_now(), 10_000_000, 0.0);
        tl.steer(&mut k, &state, tl.raw_now());
        k.oscillator_ns += S;
        tl.observe(k.read());
        k.external_step(40 * 86_400 * S);
        k.oscillator_ns += S;
        let (raw, stepped) = tl.observe(k.read());
        assert!(stepped);
        assert!(tl.steer(&mut k, &state, raw));
        assert!(
            tl.deadline().is_some_and(|d| d > raw),
            "{:?} after {raw}",
            tl.deadline()
        );
    }

    /// adjtimex failing mid-slew (a capability dropped, a seccomp filter): the deadline moves a
    /// second ahead, so the sync loop retries at 1 Hz instead of spinning on a due deadline.
    #[test]
    fn a_failed_steer_is_retried_a_second_later() {
        struct Failing(SimulatedKernel, bool);
        impl KernelClock for Failing {
            fn read(&mut self) -> ClockReading {
                self.0.read()
            }
            fn frequency(&mut self) -> io::Result<f64> {
                self.0.frequency()
            }
            fn set_frequency(&mut self, frequency: f64) -> io::Result<f64> {
                if self.1 {
                    return Err(io::Error::from_raw_os_error(libc::EPERM));
                }
                self.0.set_frequency(frequency)
            }
            fn step(&mut self, delta_ns: i64) -> io::Result<()> {
                self.0.step(delta_ns)
            }
            fn set_sync_status(&mut self, synced: bool, max_error: f64, est_error: f64) -> io::Result<()> {
                self.0.set_sync_status(synced, max_error, est_error)
            }
            fn take_over(&mut self) -> io::Result<()> {
                self.0.take_over()
            }
            fn set_leap(&mut self, leap: LeapIndicator) -> io::Result<()> {
                self.0.set_leap(leap)
            }
        }
        let mut k = Failing(SimulatedKernel::new(O0, 0.0), false);
        let mut tl = Timeline::new(true, k.read(), 0.0);
        let state = synced(tl.raw_now(), 10_000_000, 0.0);
        tl.steer(&mut k, &state, tl.raw_now());
        let end = tl.deadline().expect("slewing 10 ms");
        k.1 = true;
        k.0.oscillator_ns = end + S;
        let (raw, _) = tl.observe(k.read());
        assert!(tl.steer(&mut k, &state, raw));
        assert!(matches!(
            tl.last_event,
            Some(KernelEvent::Failed { errno: libc::EPERM, .. })
        ));
        let next = tl.deadline().expect("still slewing");
        assert!(next >= raw + S, "deadline {next} is not a second after {raw}");
    }
}

//! Clock discipline: turns the combined estimate into published [`ClockState`]s.
//!
//! In software mode the correction (true time minus kernel realtime) is a piecewise linear
//! function of realtime, and every new piece starts where the previous one is at that instant,
//! so served time never jumps. Phase errors are removed by slewing (a temporary extra frequency,
//! at most [`MAX_SLEW`]), frequency errors by adopting the estimated frequency. The one step
//! allowed is at first synchronisation, while replies still say "unsynchronised".
//!
//! Because the estimate measures the raw kernel clock and is not fed back, there is no control
//! loop to keep stable (unlike an RFC 5905 PLL steering the clock it measures).

use super::filter::MAX_FREQUENCY;
use super::{ClockMode, MakeStep, nanos_to_secs, secs_to_nanos};
use crate::clock::{ClockState, PHI};
use crate::proto::{LeapIndicator, RefId};
use core::fmt;

/// Extra frequency for slewing away phase errors, on top of the estimated frequency: gentle, as
/// clients see it in served time.
pub const MAX_SLEW: f64 = 50e-6;
/// Largest published frequency (s/s) including slew: served time advances at least
/// 1 - 0.05 s per second of realtime, so T3 never goes backwards.
pub const MAX_TOTAL_FREQUENCY: f64 = MAX_FREQUENCY + MAX_SLEW;
/// Shortest slew: small corrections are spread over this long, not applied in a burst.
pub const MIN_SLEW_NS: i64 = 8_000_000_000;
/// Phase errors smaller than this are not worth a new slew.
const NEGLIGIBLE_PHASE: f64 = 50e-9;
/// The estimate must rest on this many samples of the system peer before the first step: as
/// chrony, the fewest that show a frequency and one residual (an iburst syncs in 4 s).
pub const MIN_SAMPLES_TO_SYNC: usize = 3;
/// In local-clock mode, the reference time is refreshed this often.
pub const LOCAL_REFRESH_NS: i64 = 16_000_000_000;

/// The combined view of all selected sources at one instant.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct SystemEstimate {
    /// True time minus local realtime (s).
    pub offset: f64,
    pub frequency: f64,
    pub offset_sigma: f64,
    pub frequency_sigma: f64,
    /// System peer's root delay plus its path delay.
    pub root_delay: f64,
    /// Upstream root dispersion + peer dispersion + jitter + estimation error.
    pub root_dispersion: f64,
    pub stratum: u8,
    pub reference_id: RefId,
    pub leap: LeapIndicator,
}

/// Why the kernel clock cannot be steered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ClockModeError {
    /// Mode `system` without CAP_SYS_TIME in the effective set.
    MissingCapSysTime,
    /// /proc/self/status could not be read or parsed.
    CapabilityUnknown,
}

impl fmt::Display for ClockModeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClockModeError::MissingCapSysTime => write!(
                f,
                "clock mode \"system\" needs CAP_SYS_TIME (run as root or grant the capability), \
                 or use mode \"software\""
            ),
            ClockModeError::CapabilityUnknown => {
                write!(
                    f,
                    "clock mode \"system\": cannot read capabilities from /proc/self/status"
                )
            }
        }
    }
}

impl std::error::Error for ClockModeError {}

const CAP_SYS_TIME: u32 = 25;

/// True when the `CapEff:` line of a `/proc/PID/status` text has CAP_SYS_TIME.
pub fn status_has_cap_sys_time(status: &str) -> Result<bool, ClockModeError> {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or(ClockModeError::CapabilityUnknown)?;
    let bits = u64::from_str_radix(hex.trim(), 16).map_err(|_| ClockModeError::CapabilityUnknown)?;
    Ok(bits >> CAP_SYS_TIME & 1 == 1)
}

/// Checks that `mode` can run here: software always can, system only with CAP_SYS_TIME (checked
/// up front, so that a missing capability is a start-up error, not a failed adjtimex later).
pub fn check_system_mode(mode: ClockMode) -> Result<(), ClockModeError> {
    if mode == ClockMode::Software {
        return Ok(());
    }
    let status = std::fs::read_to_string("/proc/self/status").map_err(|_| ClockModeError::CapabilityUnknown)?;
    if !status_has_cap_sys_time(&status)? {
        return Err(ClockModeError::MissingCapSysTime);
    }
    Ok(())
}

/// The estimate being followed, anchored at the realtime it was made for.
#[derive(Clone, Copy, PartialEq, Debug)]
struct Target {
    at_ns: i64,
    offset: f64,
    frequency: f64,
}

impl Target {
    fn offset_at(&self, now_ns: i64) -> f64 {
        self.offset + self.frequency * nanos_to_secs(now_ns - self.at_ns)
    }
}

/// The single writer's logic. Returns states to publish; the caller publishes them in order.
#[derive(Clone, Debug)]
pub struct Discipline {
    state: ClockState,
    target: Option<Target>,
    slew_end_ns: Option<i64>,
    /// Phase left to slew at the last update (s), reported as "last offset".
    pub last_phase: f64,
    pub last_update_ns: Option<i64>,
    max_root_dispersion: f64,
    local_stratum: Option<u8>,
    /// When an update after the first may step the served correction instead of slewing it;
    /// `None` (not configured): never, so served time stays continuous once synchronised.
    pub makestep: Option<MakeStep>,
    /// Updates followed so far.
    updates: u32,
}

impl Discipline {
    pub fn new(precision: i8, max_root_dispersion: f64) -> Discipline {
        Discipline {
            state: ClockState::unsynchronized(precision),
            target: None,
            slew_end_ns: None,
            last_phase: 0.0,
            last_update_ns: None,
            max_root_dispersion,
            local_stratum: None,
            makestep: None,
            updates: 0,
        }
    }

    /// What was last returned for publishing.
    pub fn state(&self) -> &ClockState {
        &self.state
    }

    /// The estimated frequency correction, without any slew in progress (s/s).
    pub fn frequency(&self) -> Option<f64> {
        self.target.map(|t| t.frequency)
    }

    pub fn has_synced(&self) -> bool {
        self.target.is_some() || self.local_stratum.is_some()
    }

    /// The local clock as the reference (no upstreams): stratum `stratum`, refid LOCL, no
    /// correction. Call again at [`Discipline::deadline`] to refresh the reference time.
    pub fn local(&mut self, now_ns: i64, stratum: u8) -> ClockState {
        self.local_stratum = Some(stratum);
        self.state = ClockState {
            generation: self.state.generation,
            max_root_dispersion: self.max_root_dispersion,
            ..ClockState::local(stratum, self.state.precision, now_ns)
        };
        self.state
    }

    /// Follows a new estimate made at `now_ns`. The first one steps (nothing was served as
    /// synchronised before), later ones within [`Discipline::makestep`] step when the error is
    /// over its threshold; otherwise a slew starts from where the correction is now.
    pub fn update(&mut self, now_ns: i64, est: &SystemEstimate) -> ClockState {
        let frequency = est.frequency.clamp(-MAX_FREQUENCY, MAX_FREQUENCY);
        let target = Target {
            at_ns: now_ns,
            offset: est.offset,
            frequency,
        };
        let first = self.target.is_none();
        self.target = Some(target);
        self.last_update_ns = Some(now_ns);
        self.updates = self.updates.saturating_add(1);
        let now_offset_ns = self.state.offset_at(now_ns);
        let error = est.offset - nanos_to_secs(now_offset_ns);
        let step = first || self.makestep.is_some_and(|m| m.allows(self.updates, error));
        let offset_ns = if step { secs_to_nanos(est.offset) } else { now_offset_ns };
        let phase = est.offset - nanos_to_secs(offset_ns);
        self.last_phase = phase;
        let (slew, end) = slew_for(phase, now_ns);
        self.slew_end_ns = end;
        self.state = ClockState {
            base_realtime_ns: now_ns,
            offset_ns,
            frequency: frequency + slew,
            leap: est.leap,
            stratum: est.stratum,
            reference_id: est.reference_id,
            reference_time_ns: now_ns + offset_ns,
            root_delay: est.root_delay,
            // While slewing, the published correction is off the estimate by up to `phase`.
            root_dispersion: est.root_dispersion + phase.abs(),
            // PHI for the clock's wander, plus what the frequency estimate may be off by.
            dispersion_rate: PHI + 3.0 * est.frequency_sigma,
            max_root_dispersion: self.max_root_dispersion,
            ..self.state
        };
        self.state
    }

    /// Moves the correction and the estimate followed by `delta_ns` at once: a leap second
    /// took effect (the published state already served it from its instant on).
    pub fn shift(&mut self, delta_ns: i64) {
        self.state.offset_ns += delta_ns;
        if let Some(t) = &mut self.target {
            t.offset += nanos_to_secs(delta_ns);
        }
    }

    /// When [`Discipline::tick`] has something to do: the end of a slew, or a local refresh.
    pub fn deadline(&self) -> Option<i64> {
        match self.local_stratum {
            Some(_) => Some(self.state.base_realtime_ns + LOCAL_REFRESH_NS),
            None => self.slew_end_ns,
        }
    }

    /// Ends a slew that is due (re-aiming at the estimate, so a late call costs nothing), or
    /// refreshes the local clock. Root dispersion keeps growing: no new information came in.
    pub fn tick(&mut self, now_ns: i64) -> Option<ClockState> {
        if let Some(stratum) = self.local_stratum {
            return (now_ns >= self.state.base_realtime_ns + LOCAL_REFRESH_NS).then(|| self.local(now_ns, stratum));
        }
        let end = self.slew_end_ns?;
        let target = self.target?;
        if now_ns < end {
            return None;
        }
        let offset_ns = self.state.offset_at(now_ns);
        let phase = target.offset_at(now_ns) - nanos_to_secs(offset_ns);
        let (slew, end) = slew_for(phase, now_ns);
        self.slew_end_ns = end;
        self.state = ClockState {
            base_realtime_ns: now_ns,
            offset_ns,
            frequency: target.frequency + slew,
            root_dispersion: self.state.root_dispersion_at(now_ns),
            ..self.state
        };
        Some(self.state)
    }
}

/// Extra frequency that removes `phase` (s) and when it is done; none for a negligible phase.
fn slew_for(phase: f64, now_ns: i64) -> (f64, Option<i64>) {
    if phase.abs() < NEGLIGIBLE_PHASE {
        return (0.0, None);
    }
    // A phase of years (an upstream's GPS week rollover) takes longer to slew than i64
    // nanoseconds count: the end saturates and the rate stays at MAX_SLEW.
    let duration_ns = secs_to_nanos(phase.abs() / MAX_SLEW).max(MIN_SLEW_NS);
    let slew = (phase / nanos_to_secs(duration_ns)).clamp(-MAX_SLEW, MAX_SLEW);
    (slew, Some(now_ns.saturating_add(duration_ns)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000_000_000;

    fn est(offset: f64, frequency: f64) -> SystemEstimate {
        SystemEstimate {
            offset,
            frequency,
            offset_sigma: 1e-5,
            frequency_sigma: 1e-7,
            root_delay: 0.01,
            root_dispersion: 0.001,
            stratum: 2,
            reference_id: RefId([127, 0, 0, 1]),
            leap: LeapIndicator::NoWarning,
        }
    }

    #[test]
    fn first_update_steps_then_slews_continuously() {
        let mut d = Discipline::new(-20, 1.0);
        let s1 = d.update(T0, &est(0.1, -1e-4));
        assert_eq!(s1.offset_ns, 100_000_000);
        assert!(s1.is_synchronized());
        let t = T0 + 64_000_000_000;
        let s2 = d.update(t, &est(0.1 - 64e-4 + 0.002, -1e-4));
        assert_eq!(s2.offset_at(t), s1.offset_at(t));
        assert!(s2.frequency.abs() <= MAX_TOTAL_FREQUENCY);
        let end = d.deadline().unwrap();
        assert!(end >= t + MIN_SLEW_NS);
        let s3 = d.tick(end).unwrap();
        assert_eq!(s3.offset_at(end), s2.offset_at(end));
        // After the slew, the correction is on the estimate.
        let expected = 0.1 - 64e-4 + 0.002 - 1e-4 * nanos_to_secs(end - t);
        assert!((nanos_to_secs(s3.offset_at(end)) - expected).abs() < 1e-8);
        assert_eq!(s3.frequency, -1e-4);
        assert_eq!(d.deadline(), None);
    }

    #[test]
    fn makestep_steps_large_errors_in_the_first_updates_only() {
        let mut d = Discipline::new(-20, 1.0);
        d.update(T0, &est(0.0, 0.0));
        let t = T0 + 16_000_000_000;
        // Not configured: once synchronised, served time is never stepped.
        let mut unset = d.clone();
        let s = unset.update(t, &est(2.0, 0.0));
        assert_eq!(s.offset_at(t), 0);
        d.makestep = Some(MakeStep {
            threshold: 0.5,
            limit: Some(2),
        });
        // Second update under the threshold: slewed, continuous.
        let mut small = d.clone();
        let s = small.update(t, &est(0.4, 0.0));
        assert_eq!(s.offset_at(t), 0);
        // Second update, 2 s off: within the limit and over the threshold, so stepped.
        let s = d.update(t, &est(2.0, 0.0));
        assert_eq!(s.offset_at(t), 2_000_000_000);
        assert_eq!(d.deadline(), None, "nothing left to slew");
        // Third update: past the limit, slewed however large.
        let t3 = t + 16_000_000_000;
        let before = d.state().offset_at(t3);
        let s = d.update(t3, &est(10.0, 0.0));
        assert_eq!(s.offset_at(t3), before);
        assert!(s.frequency > 0.0 && d.deadline().is_some());
    }

    #[test]
    fn large_phase_slews_at_bounded_rate() {
        let mut d = Discipline::new(-20, 1.0);
        d.update(T0, &est(0.0, 0.0));
        let s = d.update(T0 + 1_000_000_000, &est(0.5, 4.5e-4));
        assert!(s.frequency <= MAX_TOTAL_FREQUENCY + 1e-15);
        assert!(s.root_dispersion >= 0.5);
    }

    #[test]
    fn phase_of_decades_slews_at_bounded_rate() {
        for phase in [1e9, -1e9] {
            let mut d = Discipline::new(-20, 1.0);
            d.update(T0, &est(0.0, 0.0));
            let t = T0 + 1_000_000_000;
            let s = d.update(t, &est(phase, 4.5e-4));
            assert!(s.frequency.abs() <= MAX_TOTAL_FREQUENCY + 1e-15, "{s:?}");
            assert!(d.deadline().is_some_and(|end| end > t + MIN_SLEW_NS));
            assert_eq!(d.tick(t + MIN_SLEW_NS), None);
        }
    }

    #[test]
    fn capability_parsing() {
        let with = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        let without = "CapEff:\t0000000000000000\n";
        assert_eq!(status_has_cap_sys_time(with), Ok(true));
        assert_eq!(status_has_cap_sys_time(without), Ok(false));
        assert_eq!(
            status_has_cap_sys_time("Name: x"),
            Err(ClockModeError::CapabilityUnknown)
        );
        assert_eq!(check_system_mode(ClockMode::Software), Ok(()));
        // System mode is refused exactly when this process lacks the capability.
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        let expected = match status_has_cap_sys_time(&own).unwrap() {
            true => Ok(()),
            false => Err(ClockModeError::MissingCapSysTime),
        };
        assert_eq!(check_system_mode(ClockMode::System), expected);
    }

    #[test]
    fn local_clock_refreshes() {
        let mut d = Discipline::new(-20, 1.0);
        let s = d.local(T0, 3);
        assert_eq!((s.stratum, s.reference_id, s.offset_ns), (3, RefId::LOCL, 0));
        assert_eq!(d.tick(T0 + 1), None);
        let s2 = d.tick(d.deadline().unwrap()).unwrap();
        assert_eq!(s2.reference_time_ns, T0 + LOCAL_REFRESH_NS);
    }
}

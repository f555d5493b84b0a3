//! The real kernel clock for [`super::kernel::Timeline`]: `clock_gettime` and `clock_adjtime`
//! on CLOCK_REALTIME. Only the frequency (tick and freq), a step and the status words are ever set. On taking
//! over, the kernel's PLL/FLL is switched off and phase corrections left by other programs are
//! cancelled (as chrony does), so nothing but gnomon moves the clock's phase.

use super::kernel::{ClockReading, KernelClock, combined_frequency, split_frequency};
use crate::proto::LeapIndicator;
use std::io;

/// A reading pair whose two CLOCK_REALTIME reads are further apart was preempted: retried.
const READ_WINDOW_NS: i64 = 20_000;

/// CLOCK_REALTIME via `clock_adjtime`; holds the kernel's nominal tick (microseconds).
#[derive(Debug)]
pub struct LinuxClock {
    base_tick: i64,
}

impl LinuxClock {
    /// Fails where a sandbox denies CLOCK_REALTIME or CLOCK_BOOTTIME: a clock that reads 0 would
    /// look like an external step at every reading.
    pub fn new() -> io::Result<LinuxClock> {
        gettime(libc::CLOCK_REALTIME)?;
        gettime(libc::CLOCK_BOOTTIME)?;
        // SAFETY: sysconf has no preconditions; it returns -1 for an unknown name.
        // c_long is i32 on some 32-bit targets.
        #[allow(clippy::useless_conversion)]
        let hz = i64::from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) });
        if hz <= 0 {
            return Err(io::Error::other("sysconf(_SC_CLK_TCK) failed"));
        }
        // As the kernel's NTP code: USER_HZ jiffies of this many microseconds make a second.
        Ok(LinuxClock {
            base_tick: (1_000_000 + hz / 2) / hz,
        })
    }
}

fn gettime(clock: libc::clockid_t) -> io::Result<i64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // time_t and c_long are i64 here but i32 on some 32-bit targets.
    #[allow(clippy::useless_conversion)]
    let ns = i64::from(ts.tv_sec) * 1_000_000_000 + i64::from(ts.tv_nsec);
    Ok(ns)
}

/// Reads a clock that [`LinuxClock::new`] has shown to work.
fn now(clock: libc::clockid_t) -> i64 {
    gettime(clock).unwrap_or_else(|e| unreachable!("clock {clock} worked at start-up: {e}"))
}

/// `clock_adjtime(CLOCK_REALTIME)` with the given modes; the kernel's view comes back in it.
fn adjtime(tx: &mut libc::timex) -> io::Result<libc::c_int> {
    // SAFETY: `tx` is a valid, initialised timex owned by the caller for the duration of the call.
    let r = unsafe { libc::clock_adjtime(libc::CLOCK_REALTIME, tx) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn timex(modes: libc::c_uint) -> libc::timex {
    // SAFETY: timex is plain integers; all-zero is a valid value (modes 0 = read only).
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    tx.modes = modes;
    tx
}

impl KernelClock for LinuxClock {
    fn read(&mut self) -> ClockReading {
        let mut best: Option<(i64, ClockReading)> = None;
        for _ in 0..8 {
            let a = now(libc::CLOCK_REALTIME);
            let boottime_ns = now(libc::CLOCK_BOOTTIME);
            let b = now(libc::CLOCK_REALTIME);
            let reading = ClockReading {
                realtime_ns: a + (b - a) / 2,
                boottime_ns,
            };
            if b - a <= READ_WINDOW_NS {
                return reading;
            }
            // Preempted every time: the tightest pair is the least wrong.
            if best.is_none_or(|(w, _)| b - a < w) {
                best = Some((b - a, reading));
            }
        }
        best.expect("eight readings").1
    }

    fn frequency(&mut self) -> io::Result<f64> {
        let mut tx = timex(0);
        adjtime(&mut tx)?;
        #[allow(clippy::useless_conversion)]
        Ok(combined_frequency(
            i64::from(tx.tick),
            i64::from(tx.freq),
            self.base_tick,
        ))
    }

    fn set_frequency(&mut self, frequency: f64) -> io::Result<f64> {
        let (tick, freq) = split_frequency(frequency, self.base_tick);
        let mut tx = timex(libc::ADJ_FREQUENCY | libc::ADJ_TICK);
        tx.tick = tick as _;
        tx.freq = freq as _;
        adjtime(&mut tx)?;
        #[allow(clippy::useless_conversion)]
        Ok(combined_frequency(
            i64::from(tx.tick),
            i64::from(tx.freq),
            self.base_tick,
        ))
    }

    fn step(&mut self, delta_ns: i64) -> io::Result<()> {
        let mut tx = timex(libc::ADJ_SETOFFSET | libc::ADJ_NANO);
        // The kernel wants a normalised timeval: tv_usec (nanoseconds with ADJ_NANO) in [0, 1e9).
        tx.time.tv_sec = delta_ns.div_euclid(1_000_000_000) as _;
        tx.time.tv_usec = delta_ns.rem_euclid(1_000_000_000) as _;
        adjtime(&mut tx).map(drop)
    }

    fn set_sync_status(&mut self, synced: bool, max_error: f64, est_error: f64) -> io::Result<()> {
        let mut read = timex(0);
        adjtime(&mut read)?;
        let mut tx = timex(libc::ADJ_STATUS | libc::ADJ_MAXERROR | libc::ADJ_ESTERROR);
        // Keep what others set (leap flags among them) but the PLL/FLL, which would move the
        // phase behind gnomon's back, and say whether time is synchronised.
        let mut status =
            read.status & !(libc::STA_PLL | libc::STA_FLL | libc::STA_PPSFREQ | libc::STA_PPSTIME | libc::STA_UNSYNC);
        if !synced {
            status |= libc::STA_UNSYNC;
        }
        tx.status = status;
        // Microseconds; the kernel caps them at 16 s (NTP_PHASE_LIMIT).
        tx.maxerror = (max_error * 1e6).clamp(0.0, 16e6) as _;
        tx.esterror = (est_error * 1e6).clamp(0.0, 16e6) as _;
        adjtime(&mut tx).map(drop)
    }

    fn set_leap(&mut self, leap: LeapIndicator) -> io::Result<()> {
        let mut read = timex(0);
        adjtime(&mut read)?;
        let mut tx = timex(libc::ADJ_STATUS);
        let armed = match leap {
            LeapIndicator::AddSecond => libc::STA_INS,
            LeapIndicator::DeleteSecond => libc::STA_DEL,
            _ => 0,
        };
        tx.status = (read.status & !(libc::STA_INS | libc::STA_DEL)) | armed;
        adjtime(&mut tx).map(drop)
    }

    fn take_over(&mut self) -> io::Result<()> {
        // A PLL offset left by ntpd or chronyd keeps being applied every second; writing offset
        // 0 in PLL mode cancels it (the status is rewritten by set_sync_status afterwards).
        // Meanwhile the kernel is told it is unsynchronised (so it does not set the RTC from a
        // clock gnomon has not yet corrected), and leap flags others set are kept.
        let mut read = timex(0);
        adjtime(&mut read)?;
        let mut pll = timex(libc::ADJ_OFFSET | libc::ADJ_STATUS);
        pll.status = libc::STA_PLL | libc::STA_UNSYNC | (read.status & (libc::STA_INS | libc::STA_DEL));
        pll.offset = 0;
        adjtime(&mut pll)?;
        // An adjtime() slew in progress is separate: a single-shot offset of 0 cancels it.
        let mut single = timex(libc::ADJ_OFFSET_SINGLESHOT);
        single.offset = 0;
        adjtime(&mut single).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read-only: modes 0 changes nothing, so this runs anywhere without touching the clock.
    #[test]
    fn reads_the_kernel_clock_without_changing_it() {
        let mut k = LinuxClock::new().expect("clocks readable");
        let f = k.frequency().expect("adjtimex read needs no privilege");
        assert!(f.abs() <= 600e-6, "frequency setting {f}");
        let r = k.read();
        let again = k.read();
        assert!(again.realtime_ns >= r.realtime_ns);
        // No step between two readings: their REALTIME - MONOTONIC agree closely.
        let gap = |c: ClockReading| c.realtime_ns - c.boottime_ns;
        assert!((gap(again) - gap(r)).abs() < 1_000_000);
    }
}

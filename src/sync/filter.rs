//! Per-source estimator: a weighted linear regression of measured offset against local time over
//! the last [`MAX_SAMPLES`] samples, in the manner of chrony's sourcestats.
//!
//! Why a regression rather than the RFC 5905 8-stage minimum-delay filter: in software mode the
//! samples measure the *raw* kernel clock, whose offset keeps moving at its frequency error
//! (100 ppm moves 6 ms a minute). The RFC filter would return the lowest-delay sample however
//! old it is; a regression instead yields the offset *now* and the frequency, which the
//! discipline needs anyway. The RFC's minimum-delay idea survives as the weights: a sample's
//! offset error is bounded by half its delay, so samples whose delay exceeds the minimum get a
//! weight falling with the square of that excess.

use super::nanos_to_secs;
use crate::clock::PHI;
use crate::proto::{LeapIndicator, RefId};
use std::collections::VecDeque;

/// Samples kept per source, as chrony: 64 polls (68 minutes at 64 s, 18 hours at 1024 s). When
/// the jitter dominates (the clock is predictable for longer than the samples are precise), a
/// long window averages it down and lets the poll grow; when the clock wanders, the runs test
/// keeps the window short.
pub const MAX_SAMPLES: usize = 64;
/// Frequency estimates beyond this (s/s) are clamped: no working clock is that far off. Wider
/// than the kernel's `timex.freq` (500 ppm): clocks 5000 ppm off exist (chrony's scenario 003),
/// and the kernel's tick reaches 10% (see [`super::kernel::KERNEL_MAX_FREQUENCY`]).
pub const MAX_FREQUENCY: f64 = 0.05;
/// Frequency uncertainty assumed from a single sample.
const UNKNOWN_FREQUENCY_SIGMA: f64 = 1e-4;

/// One validated measurement.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Sample {
    /// Local realtime at the middle of the exchange, (T1 + T4) / 2.
    pub local_ns: i64,
    /// Seconds, upstream time minus local realtime (RFC 5905 theta).
    pub offset: f64,
    /// Round-trip delay in seconds (RFC 5905 delta), at least the precision.
    pub delay: f64,
    /// Seconds: both precisions plus PHI over the round trip (RFC 5905 epsilon).
    pub dispersion: f64,
    pub root_delay: f64,
    pub root_dispersion: f64,
    pub leap: LeapIndicator,
    pub stratum: u8,
    pub reference_id: RefId,
}

/// What a source says about the local clock, extrapolated to a given instant.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Estimate {
    /// Upstream time minus local realtime at the requested instant (s).
    pub offset: f64,
    /// Rate of change of `offset` (s/s): minus the local clock's frequency error.
    pub frequency: f64,
    /// Standard error of `offset` at the instant (s).
    pub offset_sigma: f64,
    /// Standard error of `frequency`.
    pub frequency_sigma: f64,
    /// Smallest delay among the samples (s).
    pub delay: f64,
    /// Weighted RMS of the residuals (RFC 5905 peer jitter), at least the precision.
    pub jitter: f64,
    /// Latest sample's dispersion grown by PHI since it was taken (RFC 5905 peer dispersion).
    pub dispersion: f64,
    /// Upstream root delay and root dispersion from the latest sample.
    pub root_delay: f64,
    pub root_dispersion: f64,
    pub samples: usize,
}

impl Estimate {
    /// RFC 5905 root distance (lambda): the half-width of the interval the true offset is in.
    pub fn root_distance(&self) -> f64 {
        (self.root_delay + self.delay) / 2.0 + self.root_dispersion + self.dispersion + self.jitter
    }
}

/// Jitter asymmetry (offset error per second of extra delay) this large in magnitude, with one
/// sign in this many regressions in a row, is corrected (as chrony's sourcestats). All jitter in
/// one direction gives 0.5.
const MIN_ASYMMETRY: f64 = 0.45;
const MAX_ASYMMETRY: f64 = 0.5;
const MIN_ASYMMETRY_RUN: i32 = 10;
const MAX_ASYMMETRY_RUN: i32 = 1000;

#[derive(Clone, Debug, Default)]
pub struct ClockFilter {
    samples: VecDeque<Sample>,
    /// The asymmetry the offsets are corrected by (0 until it has shown itself).
    asymmetry: f64,
    /// Regressions in a row that found it, signed by its sign.
    asymmetry_run: i32,
}

impl ClockFilter {
    pub fn add(&mut self, s: Sample) {
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
        self.update_asymmetry();
    }

    /// When queueing delays one direction more than the other, a sample's offset error grows
    /// with its delay (by half the difference of the two directions' extra delays): the slope
    /// of offset against delay, with time as the other regressor, measures it. Once it is
    /// large and steady, offsets are corrected to what they would be at the minimum delay.
    fn update_asymmetry(&mut self) {
        let Some(a) = offset_delay_slope(&self.samples) else {
            self.asymmetry = 0.0;
            self.asymmetry_run = 0;
            return;
        };
        if a * f64::from(self.asymmetry_run) < 0.0 {
            self.asymmetry = 0.0;
            self.asymmetry_run = 0;
            return;
        }
        if a <= -MIN_ASYMMETRY {
            self.asymmetry_run = (self.asymmetry_run - 1).max(-MAX_ASYMMETRY_RUN);
        } else if a >= MIN_ASYMMETRY {
            self.asymmetry_run = (self.asymmetry_run + 1).min(MAX_ASYMMETRY_RUN);
        }
        if self.asymmetry_run.abs() >= MIN_ASYMMETRY_RUN {
            self.asymmetry = a.clamp(-MAX_ASYMMETRY, MAX_ASYMMETRY);
        }
    }

    /// Moves every sample's offset by `seconds`: the clock they were measured against leapt (a
    /// leap second), so the regression carries on across it.
    pub fn shift(&mut self, seconds: f64) {
        for s in &mut self.samples {
            s.offset += seconds;
        }
    }

    /// The offset-against-delay slope in use (0: none corrected).
    pub fn asymmetry(&self) -> f64 {
        self.asymmetry
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn last(&self) -> Option<&Sample> {
        self.samples.back()
    }

    /// The source's view of the local clock at `now_ns`. `precision` is ours, in seconds.
    pub fn estimate(&self, now_ns: i64, precision: f64) -> Option<Estimate> {
        let last = *self.samples.back()?;
        let min_delay = self.samples.iter().map(|s| s.delay).fold(f64::INFINITY, f64::min);
        // Noise floor: half the lower-quartile delay excess, so one lucky sample does not take
        // all the weight when every sample is noisy.
        let mut excess = [0.0f64; MAX_SAMPLES];
        let excess = &mut excess[..self.samples.len()];
        for (x, s) in excess.iter_mut().zip(&self.samples) {
            *x = s.delay - min_delay;
        }
        excess.sort_by(f64::total_cmp);
        let floor = (excess[excess.len() / 4] / 2.0).max(precision).max(1e-9);
        let mut points = [(0.0, 0.0, 0.0); MAX_SAMPLES];
        let points = &mut points[..self.samples.len()];
        for (p, s) in points.iter_mut().zip(&self.samples) {
            let e = (s.delay - min_delay) / 2.0 + floor;
            let offset = s.offset - self.asymmetry * (s.delay - min_delay);
            *p = (nanos_to_secs(s.local_ns - last.local_ns), offset, 1.0 / (e * e));
        }
        // Like chrony's runs test: while the residuals' signs form too few runs, the line does
        // not fit (the frequency wandered), so older samples are dropped. As chrony, the signs
        // are counted over up to twice the window, the line extended back over older samples:
        // a window whose line does not also fit the samples before it is following a frequency
        // that has since moved, and a wandering clock then keeps a short window (and so a
        // short poll) instead of one as long as its line happens to pass the test.
        let mut fit = Fit::new(points);
        for start in 1..points.len().saturating_sub(MIN_WINDOW - 1) {
            let from = points.len().saturating_sub(RUNS_RATIO * fit.n);
            let runs = fit.runs(&points[from..]);
            // Residuals down at the clock's resolution have nothing left to explain. (Not the
            // weights' noise floor: once jitter asymmetry is corrected, the offsets are far
            // better than their delays say, and a line through them can be off by a wander
            // several times their noise while still inside that floor.)
            if runs >= min_runs(points.len() - from) || fit.rss / fit.sw <= 0.25 * precision.max(1e-9).powi(2) {
                break;
            }
            fit = Fit::new(&points[start..]);
        }
        let n = fit.n;
        let now_rel = nanos_to_secs(now_ns - last.local_ns);
        // Variance of unit weight: from the residuals when there are spare degrees of freedom,
        // else from the weights alone (the noise floor). Residuals that happen to be tiny must
        // not make the estimate overconfident.
        let unit_var = if n > 2 { fit.rss / (n - 2) as f64 } else { 1.0 }.max(0.01);
        let (frequency_sigma, offset_sigma) = if fit.stt > 0.0 {
            let fs = (unit_var / fit.stt).sqrt();
            let os = (unit_var * (1.0 / fit.sw + (now_rel - fit.tbar).powi(2) / fit.stt)).sqrt();
            (fs, os)
        } else {
            let os = (unit_var / fit.sw).sqrt() + UNKNOWN_FREQUENCY_SIGMA * (now_rel - fit.tbar).abs();
            (UNKNOWN_FREQUENCY_SIGMA, os)
        };
        Some(Estimate {
            offset: fit.ybar + fit.frequency * (now_rel - fit.tbar),
            frequency: fit.frequency,
            offset_sigma,
            frequency_sigma,
            delay: min_delay,
            jitter: (fit.rss / fit.sw).sqrt().max(precision),
            dispersion: last.dispersion + PHI * now_rel.max(0.0),
            root_delay: last.root_delay,
            root_dispersion: last.root_dispersion,
            samples: n,
        })
    }
}

/// Least squares of offset against time and delay together: the coefficient of delay, or
/// `None` when the samples cannot tell it (too few, or delay and time not independent).
fn offset_delay_slope(samples: &VecDeque<Sample>) -> Option<f64> {
    let n = samples.len();
    if n < 4 {
        return None;
    }
    let last = samples.back()?.local_ns;
    let nf = n as f64;
    let x = |s: &Sample| nanos_to_secs(s.local_ns - last);
    let (mx, md, my) = samples.iter().fold((0.0, 0.0, 0.0), |(a, b, c), s| {
        (a + x(s) / nf, b + s.delay / nf, c + s.offset / nf)
    });
    let (mut sxx, mut sdd, mut sxd, mut sxy, mut sdy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for s in samples {
        let (dx, dd, dy) = (x(s) - mx, s.delay - md, s.offset - my);
        sxx += dx * dx;
        sdd += dd * dd;
        sxd += dx * dd;
        sxy += dx * dy;
        sdy += dd * dy;
    }
    let det = sxx * sdd - sxd * sxd;
    // Delay must vary independently of time for its slope to mean anything.
    if sdd <= 0.0 || det.is_nan() || det <= 1e-12 * sxx * sdd {
        return None;
    }
    Some((sxx * sdy - sxd * sxy) / det)
}

/// The regression never drops below this many samples.
const MIN_WINDOW: usize = 4;
/// The runs test looks at this many times the regression's samples (chrony's
/// REGRESS_RUNS_RATIO), older ones included where there are any.
const RUNS_RATIO: usize = 2;

/// Fewest sign runs that n residuals of a good fit show (one-sided 5%, normal approximation of
/// the Wald-Wolfowitz runs test with equal signs: mean (n+1)/2, variance (n-1)/4).
fn min_runs(n: usize) -> usize {
    let n = n as f64;
    ((n + 1.0) / 2.0 - 1.645 * ((n - 1.0) / 4.0).sqrt()).ceil().max(1.0) as usize
}

/// Weighted least squares of offset against time over (t, offset, weight) points.
struct Fit {
    n: usize,
    sw: f64,
    tbar: f64,
    ybar: f64,
    stt: f64,
    frequency: f64,
    rss: f64,
}

impl Fit {
    fn new(points: &[(f64, f64, f64)]) -> Fit {
        let sw: f64 = points.iter().map(|p| p.2).sum();
        let tbar = points.iter().map(|p| p.0 * p.2).sum::<f64>() / sw;
        let ybar = points.iter().map(|p| p.1 * p.2).sum::<f64>() / sw;
        let stt: f64 = points.iter().map(|p| p.2 * (p.0 - tbar).powi(2)).sum();
        let frequency = if points.len() >= 2 && stt > 0.0 {
            let sty: f64 = points.iter().map(|p| p.2 * (p.0 - tbar) * (p.1 - ybar)).sum();
            (sty / stt).clamp(-MAX_FREQUENCY, MAX_FREQUENCY)
        } else {
            0.0
        };
        let residual = |p: &(f64, f64, f64)| p.1 - ybar - frequency * (p.0 - tbar);
        let rss = points.iter().map(|p| p.2 * residual(p).powi(2)).sum();
        Fit {
            n: points.len(),
            sw,
            tbar,
            ybar,
            stt: if points.len() >= 2 { stt } else { 0.0 },
            frequency,
            rss,
        }
    }

    fn residual(&self, p: &(f64, f64, f64)) -> f64 {
        p.1 - self.ybar - self.frequency * (p.0 - self.tbar)
    }

    /// Runs of equal sign among the residuals of `points` (which may reach back before the
    /// points fitted) from this line.
    fn runs(&self, points: &[(f64, f64, f64)]) -> usize {
        1 + points
            .windows(2)
            .filter(|w| (self.residual(&w[0]) >= 0.0) != (self.residual(&w[1]) >= 0.0))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(local_ns: i64, offset: f64, delay: f64) -> Sample {
        Sample {
            local_ns,
            offset,
            delay,
            dispersion: 1e-6,
            root_delay: 0.0,
            root_dispersion: 0.0,
            leap: LeapIndicator::NoWarning,
            stratum: 1,
            reference_id: RefId(*b"GPS\0"),
        }
    }

    #[test]
    fn recovers_offset_and_frequency_of_a_line() {
        let mut f = ClockFilter::default();
        let base = 1_000_000_000_000_000_000i64;
        for i in 0..10 {
            let t = i as f64 * 64.0;
            f.add(sample(base + (t * 1e9) as i64, 0.1 - 100e-6 * t, 0.01));
        }
        let now = base + 700 * 1_000_000_000;
        let e = f.estimate(now, 1e-7).unwrap();
        assert!((e.frequency + 100e-6).abs() < 1e-9, "{}", e.frequency);
        assert!((e.offset - (0.1 - 100e-6 * 700.0)).abs() < 1e-6, "{}", e.offset);
        assert_eq!(e.samples, 10);
        assert!(e.root_distance() >= 0.005);
    }

    #[test]
    fn follows_a_clock_5000_ppm_off() {
        // chrony's scenario 003: beyond the kernel's timex.freq range, within its tick's.
        for freq in [-5e-3, 5e-3] {
            let mut f = ClockFilter::default();
            for i in 0..4 {
                let t = i as f64 * 64.0;
                f.add(sample((t * 1e9) as i64, freq * t, 1e-4));
            }
            let e = f.estimate(192_000_000_000, 1e-7).unwrap();
            assert!((e.frequency - freq).abs() < 1e-9, "{freq}: {}", e.frequency);
            assert!((e.offset - freq * 192.0).abs() < 1e-6, "{freq}: {}", e.offset);
        }
    }

    #[test]
    fn asymmetric_jitter_is_corrected_once_steady() {
        // chrony's scenario 011: the way back queues, the way out hardly: each sample's offset
        // is off by -0.47 times its extra delay. Frequency 0, true offset 1 ms.
        let mut f = ClockFilter::default();
        let mut seed = 7u64;
        let mut sum_plain = 0.0;
        let mut sum_corrected = 0.0;
        for i in 0..200i64 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = (seed >> 11) as f64 / (1u64 << 53) as f64;
            let extra = -1e-3 * (1.0 - u).ln();
            f.add(sample(i * 64_000_000_000, 1e-3 - 0.47 * extra, 2e-4 + extra));
            let e = f.estimate(i * 64_000_000_000, 1e-7).unwrap();
            if i >= 100 {
                sum_corrected += (e.offset - 1e-3).abs();
                let mut plain = f.clone();
                plain.asymmetry = 0.0;
                sum_plain += (plain.estimate(i * 64_000_000_000, 1e-7).unwrap().offset - 1e-3).abs();
            }
        }
        assert!((f.asymmetry() + 0.47).abs() < 0.1, "{}", f.asymmetry());
        assert!(sum_corrected < 0.5 * sum_plain, "{sum_corrected} vs {sum_plain}");
        // Symmetric jitter is left alone.
        let mut g = ClockFilter::default();
        for i in 0..200i64 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let u = (seed >> 11) as f64 / (1u64 << 53) as f64;
            let extra = -1e-3 * (1.0 - u).ln();
            let sign = if (seed >> 7) & 1 == 0 { 1.0 } else { -1.0 };
            g.add(sample(i * 64_000_000_000, sign * 0.3 * extra, 2e-4 + extra));
        }
        assert_eq!(g.asymmetry(), 0.0);
    }

    #[test]
    fn high_delay_samples_weigh_less() {
        let mut f = ClockFilter::default();
        let base = 0i64;
        for i in 0..8 {
            // Every other sample went through a queue: 20 ms more delay, 10 ms offset error.
            let (o, d) = if i % 2 == 0 { (0.0, 0.01) } else { (0.01, 0.03) };
            f.add(sample(base + i * 16_000_000_000, o, d));
        }
        let e = f.estimate(base + 7 * 16_000_000_000, 1e-7).unwrap();
        assert!(e.offset.abs() < 1e-3, "{}", e.offset);
        assert_eq!(e.delay, 0.01);
    }

    #[test]
    fn wandering_frequency_shrinks_the_window() {
        // The frequency changed 8 samples ago: a line through all 16 misses the recent ones.
        let mut f = ClockFilter::default();
        for i in 0..16i64 {
            let t = i as f64 * 64.0;
            let offset = if i < 8 { 0.0 } else { 20e-6 * (t - 8.0 * 64.0) };
            f.add(sample(
                i * 64_000_000_000,
                offset + if i % 2 == 0 { 1e-6 } else { -1e-6 },
                0.01,
            ));
        }
        let e = f.estimate(15 * 64_000_000_000, 1e-7).unwrap();
        // One flat sample may stay in (that window passes the test at 5%).
        assert!((e.frequency - 20e-6).abs() < 2e-6, "{}", e.frequency);
        assert!(e.samples <= 9, "{}", e.samples);
        assert!((e.offset - 20e-6 * 7.0 * 64.0).abs() < 2e-4, "{}", e.offset);
    }

    /// Normal deviates from a fixed LCG (Box-Muller), so the tests are reproducible.
    struct Normal(u64);

    impl Normal {
        fn uniform(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        fn next(&mut self) -> f64 {
            let (u, v) = (self.uniform(), self.uniform());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        }
    }

    #[test]
    fn white_noise_is_averaged_over_a_long_window() {
        // chrony's scenario 006: jitter dominates and the clock is steady, so every sample
        // kept helps. A regression's offset at its newest sample has an error of about
        // 2 sigma / sqrt(n): 0.5 sigma with 16 samples, 0.25 with 64.
        let sigma = 1e-3;
        let mut rng = Normal(11);
        let (mut sum, mut count) = (0.0, 0);
        for _ in 0..40 {
            let mut f = ClockFilter::default();
            for i in 0..80i64 {
                f.add(sample(i * 64_000_000_000, sigma * rng.next(), 0.01));
            }
            let e = f.estimate(79 * 64_000_000_000, 1e-7).unwrap();
            sum += e.offset * e.offset;
            count += 1;
        }
        let rms = (sum / f64::from(count)).sqrt();
        assert!(rms < 0.37 * sigma, "rms {rms:e} of sigma {sigma:e}");
    }

    #[test]
    fn wandering_frequency_is_followed() {
        // chrony's scenario 007: the frequency takes a random walk of 1e-7/sqrt(s), polled
        // every 64 s, with 10 us of jitter. A line fitted over a window only as long as its
        // own residuals allow lags the walk; the runs test over twice the window (the line
        // extended back over older samples) notices sooner that it no longer fits.
        let mut rng = Normal(5);
        let (mut sum, mut count) = (0.0, 0);
        for _ in 0..10 {
            let mut f = ClockFilter::default();
            let (mut offset, mut freq) = (0.0f64, 0.0f64);
            for i in 0..400i64 {
                for _ in 0..64 {
                    freq += 1e-7 * rng.next();
                    offset += freq;
                }
                f.add(sample(i * 64_000_000_000, offset + 1e-5 * rng.next(), 0.01));
                if i >= 100 {
                    let e = f.estimate(i * 64_000_000_000, 1e-7).unwrap();
                    sum += (e.offset - offset).powi(2);
                    count += 1;
                }
            }
        }
        let rms = (sum / f64::from(count)).sqrt();
        assert!(rms < 6e-5, "rms {rms:e}");
    }

    #[test]
    fn corrected_asymmetry_still_lets_the_window_follow_wander() {
        // chrony's scenario 011: jitter 0.5 ms, 97% of it on the way back, and the default
        // wander (a random walk of the frequency, 1e-9/sqrt(s)), polled every 512 s. Corrected
        // for the asymmetry, the offsets are good to about 40 us although their delays vary by
        // a millisecond: the runs test must still cut the window where the wander shows.
        let mut rng = Normal(3);
        let (mut offset, mut freq) = (0.0f64, 0.0f64);
        let mut f = ClockFilter::default();
        let (mut sum, mut count) = (0.0, 0);
        for i in 0..400i64 {
            for _ in 0..512 {
                freq += 1e-9 * rng.next();
                offset += freq;
            }
            let (e1, e2) = (-rng.uniform().ln(), -rng.uniform().ln());
            let (up, down) = (1e-4 + 0.06 * 5e-4 * e1, 1e-4 + 1.94 * 5e-4 * e2);
            f.add(sample(i * 512_000_000_000, offset + (up - down) / 2.0, up + down));
            if i >= 100 {
                let e = f.estimate(i * 512_000_000_000, 1e-7).unwrap();
                sum += (e.offset - offset).powi(2);
                count += 1;
            }
        }
        assert!(f.asymmetry() < -0.45, "{}", f.asymmetry());
        let rms = (sum / f64::from(count)).sqrt();
        assert!(rms < 7e-5, "rms {rms:e}");
    }

    #[test]
    fn window_is_bounded() {
        let mut f = ClockFilter::default();
        for i in 0..100 {
            f.add(sample(i * 1_000_000_000, 0.0, 0.01));
        }
        assert_eq!(f.len(), MAX_SAMPLES);
        assert_eq!(f.last().unwrap().local_ns, 99_000_000_000);
    }

    #[test]
    fn single_sample_has_unknown_frequency() {
        let mut f = ClockFilter::default();
        f.add(sample(0, 0.25, 0.01));
        let e = f.estimate(10_000_000_000, 1e-7).unwrap();
        assert_eq!(e.offset, 0.25);
        assert_eq!(e.frequency, 0.0);
        assert!(e.frequency_sigma >= UNKNOWN_FREQUENCY_SIGMA);
        assert!(e.dispersion > PHI * 9.0);
    }
}

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

/// Samples kept per source: 16 polls (17 minutes at 64 s, 4.5 hours at 1024 s).
pub const MAX_SAMPLES: usize = 16;
/// Frequency estimates beyond this (s/s) are clamped: no working clock is that far off.
pub const MAX_FREQUENCY: f64 = 4.5e-4;
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

#[derive(Clone, Debug, Default)]
pub struct ClockFilter {
    samples: VecDeque<Sample>,
}

impl ClockFilter {
    pub fn add(&mut self, s: Sample) {
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
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

    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// The source's view of the local clock at `now_ns`. `precision` is ours, in seconds.
    pub fn estimate(&self, now_ns: i64, precision: f64) -> Option<Estimate> {
        let last = *self.samples.back()?;
        let min_delay = self.samples.iter().map(|s| s.delay).fold(f64::INFINITY, f64::min);
        // Noise floor: half the lower-quartile delay excess, so one lucky sample does not take
        // all the weight when every sample is noisy.
        let mut excess: Vec<f64> = self.samples.iter().map(|s| s.delay - min_delay).collect();
        excess.sort_by(f64::total_cmp);
        let floor = (excess[excess.len() / 4] / 2.0).max(precision).max(1e-9);
        let point = |s: &Sample| {
            let e = (s.delay - min_delay) / 2.0 + floor;
            (nanos_to_secs(s.local_ns - last.local_ns), s.offset, 1.0 / (e * e))
        };
        let sw: f64 = self.samples.iter().map(|s| point(s).2).sum();
        let tbar = self.samples.iter().map(|s| point(s).0 * point(s).2).sum::<f64>() / sw;
        let ybar = self.samples.iter().map(|s| point(s).1 * point(s).2).sum::<f64>() / sw;
        let stt: f64 = self
            .samples
            .iter()
            .map(|s| point(s).2 * (point(s).0 - tbar).powi(2))
            .sum();
        let n = self.samples.len();
        let frequency = if n >= 2 && stt > 0.0 {
            let sty: f64 = self
                .samples
                .iter()
                .map(|s| {
                    let (t, y, w) = point(s);
                    w * (t - tbar) * (y - ybar)
                })
                .sum();
            (sty / stt).clamp(-MAX_FREQUENCY, MAX_FREQUENCY)
        } else {
            0.0
        };
        let rss: f64 = self
            .samples
            .iter()
            .map(|s| {
                let (t, y, w) = point(s);
                w * (y - ybar - frequency * (t - tbar)).powi(2)
            })
            .sum();
        let jitter = (rss / sw).sqrt().max(precision);
        // Variance of unit weight: from the residuals when there are spare degrees of freedom,
        // else from the weights alone (the noise floor).
        let unit_var = if n > 2 { rss / (n - 2) as f64 } else { 1.0 };
        // Residuals that happen to be tiny must not make the estimate overconfident.
        let unit_var = unit_var.max(0.01);
        let now_rel = nanos_to_secs(now_ns - last.local_ns);
        let (frequency_sigma, offset_sigma) = if n >= 2 && stt > 0.0 {
            let fs = (unit_var / stt).sqrt();
            let os = (unit_var * (1.0 / sw + (now_rel - tbar).powi(2) / stt)).sqrt();
            (fs, os)
        } else {
            let os = (unit_var / sw).sqrt() + UNKNOWN_FREQUENCY_SIGMA * (now_rel - tbar).abs();
            (UNKNOWN_FREQUENCY_SIGMA, os)
        };
        Some(Estimate {
            offset: ybar + frequency * (now_rel - tbar),
            frequency,
            offset_sigma,
            frequency_sigma,
            delay: min_delay,
            jitter,
            dispersion: last.dispersion + PHI * now_rel.max(0.0),
            root_delay: last.root_delay,
            root_dispersion: last.root_dispersion,
            samples: n,
        })
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

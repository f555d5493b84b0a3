//! What a run found, and its four renderings: a table for people, JSON for scripts, the
//! HdrHistogram `.hgrm` percentile distribution, and an SVG of a ramp (throughput and p99
//! latency against offered rate).

use crate::snmp::SnmpCheck;
use crate::validate::{Invalid, Kiss};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Round-trip times are recorded in nanoseconds, from 1 ns to 60 s, to 3 significant digits.
pub fn new_rtt_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static bounds are valid")
}

/// RTT percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// One step of a ramp (a fixed-rate or max run is a single step).
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    /// Offered rate of the whole step (population + abusers); `None` for `--max`.
    pub offered_rate: Option<f64>,
    pub duration_s: f64,
    pub sent: u64,
    pub send_rate: f64,
    pub replies: u64,
    pub reply_rate: f64,
    pub loss_pct: f64,
    /// False when the run's time or packet budget cut the step short.
    pub complete: bool,
    pub rtt_us: Percentiles,
}

/// Per stream: the population, then each abuser.
#[derive(Clone, Debug, Serialize)]
pub struct StreamReport {
    pub name: String,
    pub rate: Option<f64>,
    pub sent: u64,
    pub replies: u64,
    pub kiss: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RampResult {
    /// Highest offered rate whose loss stayed at or under the limit (0 if none did).
    pub max_rate: f64,
    pub reply_rate: f64,
    pub loss_pct: f64,
    pub max_loss_pct: f64,
    /// The lowest offered rate that lost too much, if one was reached.
    pub first_failing_rate: Option<f64>,
    /// Why the ramp ended: "loss"; "generator" (some step could not be sent at its offered
    /// rate, so the limit may be ours); "budget" (time or packets ran out first).
    pub ended_by: &'static str,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub target: String,
    pub shape: &'static str,
    pub echo: bool,
    pub clients: u32,
    pub zipf: Option<f64>,
    pub ports: usize,
    /// Offered rate of a fixed-rate run (population + abusers).
    pub offered_rate: Option<f64>,
    /// Time spent sending, summed over steps (pauses between ramp steps excluded).
    pub duration_s: f64,
    pub sent: u64,
    pub send_rate: f64,
    /// Packets the kernel refused to take (sendmmsg errors or short counts).
    pub send_errors: u64,
    /// Packets the pacer dropped from its schedule because the generator fell behind.
    pub skipped: u64,
    /// Distinct requests answered (duplicates not counted again).
    pub replies: u64,
    pub reply_rate: f64,
    pub loss_pct: f64,
    /// Answered with a time reply that passed every check.
    pub good: u64,
    pub kiss: BTreeMap<&'static str, u64>,
    pub invalid: BTreeMap<&'static str, u64>,
    pub invalid_total: u64,
    /// Good replies by leap indicator 0..3.
    pub leap: [u64; 4],
    /// Good replies by stratum (16 = 16 or more).
    pub stratum: BTreeMap<u8, u64>,
    pub rtt_us: Percentiles,
    pub streams: Vec<StreamReport>,
    pub steps: Vec<StepReport>,
    pub ramp: Option<RampResult>,
    pub snmp: Option<SnmpCheck>,
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

impl Report {
    pub fn kiss_count(&self, k: Kiss) -> u64 {
        self.kiss.get(k.name()).copied().unwrap_or(0)
    }

    pub fn invalid_count(&self, r: Invalid) -> u64 {
        self.invalid.get(r.name()).copied().unwrap_or(0)
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// The table printed on stdout.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let rate = |r: Option<f64>| r.map_or("max".to_string(), |r| format!("{r:.0}/s"));
        let _ = writeln!(
            s,
            "gnomon-load -> {} ({}{}), {} clients{}, {} source ports",
            self.target,
            self.shape,
            if self.echo { ", echo" } else { "" },
            self.clients,
            self.zipf.map_or(String::new(), |z| format!(" zipf s={z}")),
            self.ports
        );
        if self.shape != "ramp" {
            let _ = writeln!(s, "  offered        {}", rate(self.offered_rate));
        }
        let _ = writeln!(s, "  duration       {:.2} s", self.duration_s);
        let _ = writeln!(
            s,
            "  sent           {} ({:.0}/s), send errors {}, skipped {}",
            self.sent, self.send_rate, self.send_errors, self.skipped
        );
        let _ = writeln!(s, "  replies        {} ({:.0}/s)", self.replies, self.reply_rate);
        let _ = writeln!(s, "  loss           {:.3} %", self.loss_pct);
        let _ = writeln!(s, "  good           {}", self.good);
        let kiss: Vec<String> = self.kiss.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, "  KoD            {}", kiss.join(", "));
        let inv: Vec<String> = self
            .invalid
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            s,
            "  invalid        {}{}",
            self.invalid_total,
            if inv.is_empty() {
                String::new()
            } else {
                format!(" ({})", inv.join(", "))
            }
        );
        let strata: Vec<String> = self.stratum.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        let _ = writeln!(
            s,
            "  LI 0/1/2/3     {}/{}/{}/{}   stratum {}",
            self.leap[0],
            self.leap[1],
            self.leap[2],
            self.leap[3],
            strata.join(" ")
        );
        let p = &self.rtt_us;
        let _ = writeln!(
            s,
            "  RTT us         p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (mean {:.1}, n {})",
            p.p50, p.p90, p.p99, p.p999, p.max, p.mean, p.count
        );
        if self.streams.len() > 1 {
            let _ = writeln!(
                s,
                "  {:<28} {:>10} {:>10} {:>10} {:>10}",
                "stream", "rate", "sent", "replies", "KoD"
            );
            for st in &self.streams {
                let _ = writeln!(
                    s,
                    "  {:<28} {:>10} {:>10} {:>10} {:>10}",
                    st.name,
                    rate(st.rate),
                    st.sent,
                    st.replies,
                    st.kiss
                );
            }
        }
        if self.steps.len() > 1 {
            let _ = writeln!(
                s,
                "  {:>12} {:>12} {:>12} {:>8} {:>10} {:>10}",
                "offered/s", "sent/s", "replies/s", "loss %", "p50 us", "p99 us"
            );
            for st in &self.steps {
                let _ = writeln!(
                    s,
                    "  {:>12} {:>12.0} {:>12.0} {:>8.3} {:>10.1} {:>10.1}{}",
                    rate(st.offered_rate),
                    st.send_rate,
                    st.reply_rate,
                    st.loss_pct,
                    st.rtt_us.p50,
                    st.rtt_us.p99,
                    if st.complete { "" } else { "  (cut short)" }
                );
            }
        }
        if let Some(r) = &self.ramp {
            let _ = writeln!(
                s,
                "  ramp result    max {:.0}/s at <= {}% loss (replies {:.0}/s, loss {:.3} %); ended by {}{}",
                r.max_rate,
                r.max_loss_pct,
                r.reply_rate,
                r.loss_pct,
                r.ended_by,
                r.first_failing_rate
                    .map_or(String::new(), |f| format!(", first failing {f:.0}/s"))
            );
        }
        if let Some(c) = &self.snmp {
            s.push_str(&c.human());
        }
        s
    }

    /// HdrHistogram's percentile distribution text (as `outputPercentileDistribution` writes
    /// it), values in microseconds, so standard .hgrm plotters read it.
    pub fn hgrm(&self) -> String {
        hgrm(&self.histogram, 1000.0)
    }

    /// Throughput and p99 latency against offered rate, one point per complete step.
    pub fn svg(&self) -> String {
        let points: Vec<(f64, f64, f64)> = self
            .steps
            .iter()
            .filter_map(|st| Some((st.offered_rate?, st.reply_rate, st.rtt_us.p99)))
            .collect();
        svg_plot(&points, &self.target)
    }
}

pub fn hgrm(h: &Histogram<u64>, scale: f64) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "{:>12} {:>14} {:>10} {:>14}\n\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let value = v.value_iterated_to() as f64 / scale;
        if q < 1.0 {
            let _ = writeln!(s, "{value:12.3} {q:2.12} {total:10} {:14.2}", 1.0 / (1.0 - q));
        } else {
            let _ = writeln!(s, "{value:12.3} {q:1.12} {total:10}");
        }
    }
    let sub_buckets = (2.0 * 10f64.powi(h.sigfig() as i32)).log2().ceil().exp2() as u64;
    let _ = writeln!(
        s,
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]",
        h.mean() / scale,
        h.stdev() / scale
    );
    let _ = writeln!(
        s,
        "#[Max     = {:12.3}, Total count    = {:12}]",
        h.max() as f64 / scale,
        h.len()
    );
    let _ = writeln!(
        s,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        sub_buckets
    );
    s
}

/// A round number near `v / n` for axis ticks.
fn nice_step(span: f64, n: f64) -> f64 {
    let raw = (span / n).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// The SVG by hand: two y axes (replies/s on the left, p99 RTT in us on the right), offered
/// rate along x, and the ideal replies = offered line for reference.
pub fn svg_plot(points: &[(f64, f64, f64)], title: &str) -> String {
    let (w, h) = (800.0, 480.0);
    let (l, r, t, b) = (80.0, 80.0, 40.0, 60.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let mut pts = points.to_vec();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let xmax = pts.iter().map(|p| p.0.max(p.1)).fold(1.0, f64::max) * 1.05;
    let ymax = xmax;
    let lmax = pts.iter().map(|p| p.2).fold(1.0, f64::max) * 1.1;
    let x = |v: f64| l + v / xmax * pw;
    let y = |v: f64| t + ph - v / ymax * ph;
    let yl = |v: f64| t + ph - v / lmax * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">gnomon-load ramp: {}</text>"#,
        w / 2.0,
        xml_escape(title)
    );
    let step = nice_step(xmax, 6.0);
    let mut v = 0.0;
    while v <= xmax {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{2}" stroke="#ddd"/><text x="{0:.1}" y="{3}" text-anchor="middle">{4}</text>"##,
            x(v),
            t,
            t + ph,
            t + ph + 16.0,
            fmt_rate(v)
        );
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{1:.1}" x2="{2}" y2="{1:.1}" stroke="#ddd"/><text x="{3}" y="{4:.1}" text-anchor="end">{5}</text>"##,
            l,
            y(v),
            l + pw,
            l - 6.0,
            y(v) + 4.0,
            fmt_rate(v)
        );
        v += step;
    }
    let lstep = nice_step(lmax, 6.0);
    let mut v = 0.0;
    while v <= lmax {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="#c0392b">{}</text>"##,
            l + pw + 6.0,
            yl(v) + 4.0,
            if lstep < 1.0 {
                format!("{v:.1}")
            } else {
                format!("{v:.0}")
            }
        );
        v += lstep;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">offered rate (requests/s)</text>"##,
        l + pw / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle" fill="#2c6fbb">replies/s</text>"##,
        t + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate({},{}) rotate(90)" text-anchor="middle" fill="#c0392b">p99 RTT (us)</text>"##,
        w - 18.0,
        t + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<line x1="{}" y1="{}" x2="{:.1}" y2="{:.1}" stroke="#999" stroke-dasharray="4 4"/>"##,
        x(0.0),
        y(0.0),
        x(xmax),
        y(xmax)
    );
    let line = |ys: &[f64]| -> String {
        pts.iter()
            .zip(ys)
            .map(|(p, v)| format!("{:.1},{v:.1}", x(p.0)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let thr = line(&pts.iter().map(|p| y(p.1)).collect::<Vec<_>>());
    let lat = line(&pts.iter().map(|p| yl(p.2)).collect::<Vec<_>>());
    let _ = writeln!(
        s,
        r##"<polyline points="{thr}" fill="none" stroke="#2c6fbb" stroke-width="2"/>"##
    );
    let _ = writeln!(
        s,
        r##"<polyline points="{lat}" fill="none" stroke="#c0392b" stroke-width="2"/>"##
    );
    for p in &pts {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#2c6fbb"/><circle cx="{:.1}" cy="{:.1}" r="3" fill="#c0392b"/>"##,
            x(p.0),
            y(p.1),
            x(p.0),
            yl(p.2)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" fill="#2c6fbb">&#9632; replies/s</text><text x="{}" y="{}" fill="#c0392b">&#9632; p99 RTT</text><text x="{}" y="{}" fill="#999">- - ideal</text>"##,
        l + 10.0,
        t + 16.0,
        l + 110.0,
        t + 16.0,
        l + 200.0,
        t + 16.0
    );
    s.push_str("</svg>\n");
    s
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_has_the_standard_shape() {
        let mut h = new_rtt_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let text = hgrm(&h, 1000.0);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].trim_start().starts_with("Value"));
        assert_eq!(lines[1], "");
        assert!(lines.iter().any(|l| l.starts_with("#[Max     =") && l.contains("1000")));
        // Last data line: percentile 1.0 and the full count.
        let last = lines[lines.len() - 4];
        assert!(
            last.contains("1.000000000000") && last.trim_end().ends_with("1000"),
            "{last}"
        );
    }

    #[test]
    fn svg_has_both_curves() {
        let s = svg_plot(&[(1000.0, 1000.0, 50.0), (2000.0, 1900.0, 90.0)], "t<1>");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
        assert!(s.contains("t&lt;1&gt;"));
    }
}

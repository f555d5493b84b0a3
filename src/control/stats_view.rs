//! Aggregates per-worker counters and histograms into the `gnomon stats` view (text and JSON).

use super::ControlContext;
use crate::server::stats::{Counter, WorkerStats};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Instant;

/// Requests per second over the last full second, per worker.
pub struct RateTracker {
    last: Instant,
    last_received: Vec<u64>,
    rates: Vec<f64>,
}

impl RateTracker {
    pub fn new(workers: usize) -> RateTracker {
        RateTracker {
            last: Instant::now(),
            last_received: vec![0; workers],
            rates: vec![0.0; workers],
        }
    }

    pub fn tick(&mut self, stats: &[Arc<WorkerStats>]) {
        let dt = self.last.elapsed().as_secs_f64();
        if dt < 1.0 {
            return;
        }
        self.last = Instant::now();
        for (i, s) in stats.iter().enumerate() {
            let r = s.get(Counter::Received);
            self.rates[i] = r.saturating_sub(self.last_received[i]) as f64 / dt;
            self.last_received[i] = r;
        }
    }
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

impl LatencySummary {
    fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50_ns: h.value_at_quantile(0.5),
            p90_ns: h.value_at_quantile(0.9),
            p99_ns: h.value_at_quantile(0.99),
            p999_ns: h.value_at_quantile(0.999),
            max_ns: h.max(),
        }
    }
}

#[derive(Serialize, Clone, Debug)]
pub struct WorkerView {
    pub worker: String,
    pub cpu: Option<usize>,
    pub backend: &'static str,
    pub requests_per_s: f64,
    pub counters: BTreeMap<&'static str, u64>,
    pub latency: LatencySummary,
    pub batch_mean: f64,
    pub batch_max: u64,
}

#[derive(Serialize, Clone, Debug)]
pub struct StatsSnapshot {
    pub uptime_s: f64,
    pub workers: Vec<WorkerView>,
    pub total: WorkerView,
    /// The XDP program's verdicts and the AF_XDP sockets' kernel counters (`io = "xdp"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp: Option<crate::server::xdp::XdpView>,
    /// NTS-KE connections by outcome (`ke_*`), with `[nts]` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nts_ke: Option<BTreeMap<&'static str, u64>>,
}

fn view(
    name: String,
    cpu: Option<usize>,
    backend: &'static str,
    rate: f64,
    c: &[u64; Counter::COUNT],
    lat: &Histogram<u64>,
    bat: &Histogram<u64>,
) -> WorkerView {
    WorkerView {
        worker: name,
        cpu,
        backend,
        requests_per_s: rate,
        counters: Counter::ALL.iter().map(|k| (k.name(), c[*k as usize])).collect(),
        latency: LatencySummary::of(lat),
        batch_mean: if bat.is_empty() { 0.0 } else { bat.mean() },
        batch_max: bat.max(),
    }
}

pub fn collect(ctx: &ControlContext) -> StatsSnapshot {
    let rates = ctx.rates.lock().map(|r| r.rates.clone()).unwrap_or_default();
    let mut total_c = [0u64; Counter::COUNT];
    let mut total_lat = crate::server::stats::new_latency_histogram();
    let mut total_bat = crate::server::stats::new_batch_histogram();
    let mut workers = Vec::new();
    for (i, s) in ctx.stats.iter().enumerate() {
        let c = s.counters();
        let (lat, bat) = s.histograms();
        for (t, v) in total_c.iter_mut().zip(c.iter()) {
            *t += v;
        }
        let _ = total_lat.add(&lat);
        let _ = total_bat.add(&bat);
        let rate = rates.get(i).copied().unwrap_or(0.0);
        workers.push(view(format!("{}", s.worker), s.cpu, s.backend, rate, &c, &lat, &bat));
    }
    let backend = ctx.stats.first().map_or("none", |s| s.backend);
    let total = view(
        "total".into(),
        None,
        backend,
        rates.iter().sum(),
        &total_c,
        &total_lat,
        &total_bat,
    );
    StatsSnapshot {
        uptime_s: ctx.started.elapsed().as_secs_f64(),
        workers,
        total,
        xdp: ctx.xdp.as_ref().map(|x| x.view()),
        nts_ke: ctx.ke.as_ref().map(|k| k.counters().into_iter().collect()),
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// The human table: one row per worker and a total, then the non-zero drop counters.
pub fn render(s: &StatsSnapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "uptime {:.0} s, backend {}", s.uptime_s, s.total.backend);
    let _ = writeln!(
        out,
        "{:<7} {:>4} {:>10} {:>12} {:>12} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "worker", "cpu", "req/s", "received", "answered", "batch", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us"
    );
    for w in s.workers.iter().chain(std::iter::once(&s.total)) {
        let _ = writeln!(
            out,
            "{:<7} {:>4} {:>10.0} {:>12} {:>12} {:>7.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            w.worker,
            w.cpu.map_or("-".to_string(), |c| c.to_string()),
            w.requests_per_s,
            w.counters["received"],
            w.counters["answered"],
            w.batch_mean,
            us(w.latency.p50_ns),
            us(w.latency.p90_ns),
            us(w.latency.p99_ns),
            us(w.latency.p999_ns),
            us(w.latency.max_ns),
        );
    }
    let others: Vec<_> = s
        .total
        .counters
        .iter()
        .filter(|(k, v)| **v > 0 && !matches!(**k, "received" | "answered" | "batches"))
        .collect();
    if !others.is_empty() {
        let _ = writeln!(out, "\ncounter{:>24}", "total");
        for (k, v) in others {
            let _ = writeln!(out, "{k:<22} {v:>9}");
        }
    }
    if let Some(x) = &s.xdp {
        out.push_str(&x.render());
    }
    if let Some(ke) = &s.nts_ke {
        let _ = writeln!(out, "\nNTS-KE connections{:>13}", "total");
        for (k, v) in ke {
            let _ = writeln!(out, "{k:<22} {v:>9}");
        }
    }
    out
}

//! Fuzz target: arbitrary request lines into the control socket's dispatch, over worker stats
//! filled from the input. Every answer ends in a newline; `stats json` is JSON whose counters
//! are the workers' sums; `stats reset` empties the histograms; an unknown command is an error.
#![no_main]

use gnomon::control::ControlContext;
use gnomon::server::stats::{Counter, LocalStats, WorkerStats};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

const WORKERS: usize = 2;

/// Counters, latencies and batch sizes for each worker from the first bytes; the rest is the
/// request text.
fn stats(data: &[u8]) -> (Vec<Arc<WorkerStats>>, &[u8]) {
    let (head, text) = data.split_at(data.len().min(WORKERS * 8));
    let stats = (0..WORKERS)
        .map(|w| {
            let shared = WorkerStats::new(w, (w == 0).then_some(3), "fuzz");
            let mut local = LocalStats::default();
            for (i, &b) in head.iter().skip(w * 8).take(8).enumerate() {
                // Up to 2^40 per counter: far beyond a real uptime, far from overflowing a sum.
                let c = Counter::ALL[(usize::from(b) + i) % Counter::ALL.len()];
                local.add(c, u64::from(b) << (i * 5));
                local.record_latency(i64::from(b) << (i * 4));
                local.record_batch(usize::from(b));
            }
            local.maybe_flush(&shared, 0, true);
            Arc::new(shared)
        })
        .collect();
    (stats, text)
}

fn check(ctx: &ControlContext, line: &str) {
    let answer = ctx.answer(line);
    assert!(answer.ends_with('\n'), "{line:?} -> {answer:?}");
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.first() {
        Some(&"stats") if words.contains(&"json") => {
            let v: serde_json::Value = serde_json::from_str(&answer).expect("stats json is JSON");
            assert!(v.is_object(), "{answer}");
        }
        Some(&"stats") => assert!(!answer.starts_with("error:"), "{answer}"),
        _ => assert!(answer.starts_with("error: "), "{line:?} -> {answer:?}"),
    }
    if words.first() == Some(&"stats") && words.contains(&"reset") {
        for s in &ctx.stats {
            let (lat, bat) = s.histograms();
            assert!(lat.is_empty() && bat.is_empty());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (stats, text) = stats(data);
    let sums: Vec<u64> = Counter::ALL
        .iter()
        .map(|&c| stats.iter().map(|s| s.get(c)).sum())
        .collect();
    let ctx = ControlContext::new(stats, None);
    let text = String::from_utf8_lossy(text);
    // What the socket hands over: the first line, trimmed; and the raw text, newlines and all.
    let line = text.split('\n').next().unwrap_or("").trim();
    check(&ctx, line);
    if line != text {
        check(&ctx, &text);
    }
    // The totals in JSON are the workers' sums.
    let json: serde_json::Value = serde_json::from_str(&ctx.answer("stats json")).unwrap();
    for (c, sum) in Counter::ALL.iter().zip(sums) {
        assert_eq!(json["total"]["counters"][c.name()].as_u64(), Some(sum), "{}", c.name());
    }
});

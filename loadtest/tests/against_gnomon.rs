//! gnomon-load against the real gnomon workers (the server library's `server::start` with the
//! NTP handler, in process, on both backends): a short, low-rate, bounded run has zero invalid
//! replies and zero loss, and the server's own counters agree with the generator's.

use gnomon::clock::{self, ClockState};
use gnomon::policy::{PolicyConfig, PolicySet, SharedPolicy};
use gnomon::server::ntp::NtpHandler;
use gnomon::server::stats::Counter;
use gnomon::server::{IoMode, ServeOptions};
use gnomon_load::{RunConfig, Shape, run};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[test]
fn low_rate_run_against_gnomon_is_clean_on_both_backends() {
    let mut ios = vec![IoMode::Mmsg];
    match gnomon::server::uring::probe() {
        Ok(()) => ios.extend([IoMode::Uring, IoMode::UringSend]),
        Err(e) => eprintln!("SKIPPED io_uring backend: {}", e.0),
    }
    for io in ios {
        let now = clock::realtime_ns();
        let (mut publisher, reader) = clock::snapshot(ClockState::unsynchronized(-24));
        publisher.publish(ClockState::local(1, -24, now));
        let policy = Arc::new(SharedPolicy::new(PolicySet::build(PolicyConfig::default(), None)));
        let stop = Arc::new(AtomicBool::new(false));
        let opts = ServeOptions {
            listen: vec!["127.0.0.1:0".parse().unwrap()],
            workers: 1,
            io,
            ..Default::default()
        };
        let srv = gnomon::server::start(
            &opts,
            |_, st| NtpHandler::new(reader.clone(), policy.clone(), st),
            stop.clone(),
        )
        .expect("start gnomon workers");
        let SocketAddr::V4(target) = srv.local_addrs[0] else {
            unreachable!()
        };
        let cfg = RunConfig {
            target,
            shape: Shape::Fixed { rate: 2000.0 },
            duration: Duration::from_secs(1),
            max_packets: 2_000,
            clients: 200,
            progress: false,
            ..RunConfig::default()
        };
        let report = run(&cfg).expect("load run");
        let stats = srv.stats.clone();
        stop.store(true, Ordering::Relaxed);
        srv.join().unwrap();
        assert!(report.sent >= 1_900, "{io:?}: sent only {}", report.sent);
        assert_eq!(report.invalid_total, 0, "{io:?}: invalid replies {:?}", report.invalid);
        assert_eq!(report.replies, report.sent, "{io:?}: loss {} %", report.loss_pct);
        assert_eq!(report.good, report.sent, "{io:?}");
        assert_eq!(report.stratum.get(&1).copied(), Some(report.sent), "{io:?}");
        // What the server counted (flushed on its way out) is what the generator sent.
        let answered: u64 = stats.iter().map(|s| s.get(Counter::Answered)).sum();
        assert_eq!(answered, report.sent, "{io:?}");
    }
}

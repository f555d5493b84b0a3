//! The hot path allocates nothing per request: the NTP handler is driven through many batches
//! under a counting global allocator, and the count must not move.

use gnomon::clock::{self, ClockState};
use gnomon::policy::{Action, PolicyConfig, PolicySet, RateLimitConfig, Rule, SharedPolicy};
use gnomon::proto::Destination;
use gnomon::server::ntp::NtpHandler;
use gnomon::server::stats::WorkerStats;
use gnomon::server::{Datagram, Handler};
use std::sync::Arc;

mod common;

#[global_allocator]
static GLOBAL: common::alloc::Counting = common::alloc::Counting;

/// The client is `limited` with limits it never reaches, so the access table and the rate
/// limiter are both on the path being counted.
fn policy() -> Arc<SharedPolicy> {
    let config = PolicyConfig {
        rules: vec![Rule {
            prefix: "198.51.100.0/24".parse().unwrap(),
            action: Action::Limited,
        }],
        default: Action::Deny,
        lines: Default::default(),
        rate_limit: RateLimitConfig {
            interval: 1e-3,
            burst: 1_000_000,
            table_bytes: 1 << 20,
            ..Default::default()
        },
    };
    Arc::new(SharedPolicy::new(PolicySet::build(config, None)))
}

#[test]
fn ntp_handler_does_not_allocate_per_request() {
    let (mut publisher, reader) = clock::snapshot(ClockState::unsynchronized(-24));
    let now = clock::realtime_ns();
    publisher.publish(ClockState::local(2, -24, now));
    let mut h = NtpHandler::new(reader, policy(), Arc::new(WorkerStats::new(0, None, "test")));
    let mut bufs = vec![[0u8; 1025]; 64];
    let peer: std::net::SocketAddr = "198.51.100.7:40000".parse().unwrap();
    // A destination, so the check that a reply is possible is on the counted path too.
    let ours = "192.0.2.1".parse().unwrap();
    let dest = Destination {
        addr: std::net::IpAddr::V4(ours),
        spec_dst: Some(ours),
    };
    let mut run_batches = |n: usize, h: &mut NtpHandler| {
        let mut answered = 0;
        for _ in 0..n {
            h.begin_batch();
            let mut lens = [0usize; 64];
            for (i, buf) in bufs.iter_mut().enumerate() {
                buf[0] = if i % 8 == 7 { 0x36 } else { 0x23 }; // some mode-6 packets to drop
                lens[i] = h.handle(Datagram {
                    buf,
                    len: 48,
                    truncated: false,
                    peer,
                    rx_realtime_ns: Some(now),
                    destination: Some(dest),
                });
                answered += (lens[i] > 0) as usize;
            }
            let tx = h.transmit_stamp();
            for (i, buf) in bufs.iter_mut().enumerate() {
                if lens[i] > 0 {
                    h.stamp(&mut buf[..lens[i]], now, &tx);
                }
            }
            h.end_batch(64, 64);
            // Publishing the stats (forced here; every 200 ms in a server) allocates nothing either.
            h.idle();
        }
        answered
    };
    // Warm up (histogram buckets, first flush), then count.
    run_batches(10, &mut h);
    let (answered, allocs) = common::alloc::allocations(|| run_batches(2_000, &mut h));
    assert_eq!(answered, 2_000 * 56);
    assert_eq!(allocs, 0, "{} allocations in {} requests", allocs, 2_000 * 64);
}

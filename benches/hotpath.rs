//! Per-request user-space work of the hot path, in ns/request: the request checks, the reply
//! written in place, and the whole NTP handler as the backends drive it (batch of 64).

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use gnomon::clock::{self, ClockState};
use gnomon::policy::{Action, PolicyConfig, PolicySet, RateLimitConfig, Rule, SharedPolicy};
use gnomon::proto::{
    LeapIndicator, NtpTimestamp, RefId, ReplyTemplate, ServerInfo, check_request, stamp_transmit, write_reply,
};
use gnomon::server::ntp::NtpHandler;
use gnomon::server::stats::WorkerStats;
use gnomon::server::{Datagram, Handler};
use std::hint::black_box;
use std::sync::Arc;

fn request() -> [u8; 48] {
    let mut r = [0u8; 48];
    r[0] = 0x23;
    r[2] = 6;
    r[40..48].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
    r
}

fn synced_info() -> ServerInfo {
    ServerInfo {
        leap: LeapIndicator::NoWarning,
        stratum: 2,
        precision: -24,
        root_delay: gnomon::proto::NtpShort(100),
        root_dispersion: gnomon::proto::NtpShort(200),
        reference_id: RefId([192, 0, 2, 1]),
        reference_timestamp: NtpTimestamp(0xeeb0_0000_0000_0000),
    }
}

/// No rules: every client served (the policy cost is one lookup in an empty table).
fn open_policy() -> Arc<SharedPolicy> {
    Arc::new(SharedPolicy::new(PolicySet::build(PolicyConfig::default(), None)))
}

/// A pool-operator policy: 100,000 rules, the client `limited` (with limits it never reaches).
fn pool_policy() -> Arc<SharedPolicy> {
    let mut rules: Vec<Rule> = (0..100_000u32)
        .map(|i| Rule {
            prefix: format!("{}.{}.{}.0/24", 10 + (i >> 16), (i >> 8) & 255, i & 255)
                .parse()
                .unwrap(),
            action: Action::Deny,
        })
        .collect();
    rules.push(Rule {
        prefix: "198.51.100.0/24".parse().unwrap(),
        action: Action::Limited,
    });
    let config = PolicyConfig {
        rules,
        default: Action::Serve,
        lines: Default::default(),
        rate_limit: RateLimitConfig {
            interval: 1e-3,
            burst: 1_000_000,
            ..Default::default()
        },
    };
    Arc::new(SharedPolicy::new(PolicySet::build(config, None)))
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("per_request");
    g.throughput(Throughput::Elements(1));
    let template = ReplyTemplate::new(&synced_info());
    g.bench_function("check_request", |b| {
        let r = request();
        b.iter(|| check_request(black_box(&r)))
    });
    g.bench_function("check_write_stamp", |b| {
        let mut buf = [0u8; 1025];
        b.iter(|| {
            buf[..48].copy_from_slice(&request());
            check_request(&buf[..48]).unwrap();
            let n = write_reply(&mut buf, &template, black_box(NtpTimestamp(0xeeb0_0001_0000_0000)));
            stamp_transmit(&mut buf[..n], NtpTimestamp(0xeeb0_0001_0000_1000));
            black_box(n)
        })
    });
    g.finish();

    // The handler as the backends call it: per batch of 64, one begin/transmit/end, 64 handles
    // and stamps. Reported per request.
    let mut g = c.benchmark_group("handler_batch64");
    g.throughput(Throughput::Elements(64));
    let (mut publisher, reader) = clock::snapshot(ClockState::unsynchronized(-24));
    let now = clock::realtime_ns();
    publisher.publish(ClockState::local(2, -24, now));
    let peer: std::net::SocketAddr = "198.51.100.7:40000".parse().unwrap();
    for (name, policy) in [
        ("ntp_handler_open", open_policy()),
        ("ntp_handler_100k_rules_limited", pool_policy()),
    ] {
        let mut h = NtpHandler::new(reader.clone(), policy, Arc::new(WorkerStats::new(0, None, "bench")));
        g.bench_function(name, |b| {
            b.iter_batched_ref(
                || vec![[0u8; 1025]; 64],
                |bufs| {
                    h.begin_batch();
                    let mut lens = [0usize; 64];
                    for (i, buf) in bufs.iter_mut().enumerate() {
                        buf[..48].copy_from_slice(&request());
                        lens[i] = h.handle(Datagram {
                            buf,
                            len: 48,
                            truncated: false,
                            peer,
                            rx_realtime_ns: Some(now),
                            destination: None,
                        });
                    }
                    let tx = h.transmit_stamp();
                    for (i, buf) in bufs.iter_mut().enumerate() {
                        h.stamp(&mut buf[..lens[i]], now, &tx);
                    }
                    h.end_batch(64, 64);
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

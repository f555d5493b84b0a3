//! The NTS path of the hot path allocates nothing per request either: authenticated requests
//! through the NTP handler (cookie opened, authenticator checked, new cookies sealed in place)
//! under a counting global allocator. Its own test binary, so nothing else allocates meanwhile.

use gnomon::clock::{self, ClockState};
use gnomon::nts::client;
use gnomon::nts::server::SharedKeys;
use gnomon::policy::{Action, PolicyConfig, PolicySet, SharedPolicy};
use gnomon::server::ntp::NtpHandler;
use gnomon::server::stats::{Counter, WorkerStats};
use gnomon::server::{Datagram, Handler};
use std::sync::Arc;

mod common;
#[path = "common/nts_fixture.rs"]
mod nts_fixture;

#[global_allocator]
static GLOBAL: common::alloc::Counting = common::alloc::Counting;

#[test]
fn nts_requests_do_not_allocate() {
    let (mut publisher, reader) = clock::snapshot(ClockState::unsynchronized(-24));
    let now = clock::realtime_ns();
    publisher.publish(ClockState::local(2, -24, now));
    let config = PolicyConfig {
        rules: vec![],
        default: Action::Serve,
        rate_limit: Default::default(),
        lines: Default::default(),
    };
    let policy = Arc::new(SharedPolicy::new(PolicySet::build(config, None)));
    let nts_fixture::Fixture {
        keys, session, request, ..
    } = nts_fixture::request(b"no-alloc secret", 3);
    let stats = Arc::new(WorkerStats::new(0, None, "test"));
    let mut h = NtpHandler::new(reader, policy, stats.clone()).with_nts(Arc::new(SharedKeys::new(keys)));
    let mut bufs = vec![[0u8; 1025]; 16];
    let peer: std::net::SocketAddr = "198.51.100.7:40000".parse().unwrap();
    let mut run_batches = |n: usize, h: &mut NtpHandler| {
        let mut lens = [0usize; 16];
        for _ in 0..n {
            h.begin_batch();
            for (i, buf) in bufs.iter_mut().enumerate() {
                buf[..request.len()].copy_from_slice(&request);
                lens[i] = h.handle(Datagram {
                    buf,
                    len: request.len(),
                    truncated: false,
                    peer,
                    rx_realtime_ns: Some(now),
                    destination: None,
                });
            }
            let tx = h.transmit_stamp();
            for (i, buf) in bufs.iter_mut().enumerate() {
                if lens[i] > 0 {
                    h.stamp(&mut buf[..lens[i]], now, &tx);
                }
            }
            h.end_batch(16, 16);
            h.idle();
        }
    };
    run_batches(5, &mut h);
    let ((), allocs) = common::alloc::allocations(|| run_batches(200, &mut h));
    // Every request got an authenticated reply with four cookies (the last batch checked).
    let reply = &bufs[0][..request.len()];
    assert_eq!(client::verify_reply(reply, &[7; 32], &session.s2c).unwrap().len(), 4);
    assert_eq!(stats.get(Counter::NtsAnswered), 205 * 16);
    assert_eq!(allocs, 0, "{} allocations in {} NTS requests", allocs, 200 * 16);
}

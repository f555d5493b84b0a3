//! gnomon-load against scripted fake servers on loopback: a correct one (gnomon's own reply
//! rule), one that misbehaves in a different way for each request, an echo, and one that
//! answers abusers with Kiss-o'-Death. Every run is bounded by a small packet budget.

use gnomon::clock::realtime_ns;
use gnomon::proto::{LeapIndicator, NtpDuration, NtpShort, NtpTimestamp, RefId, ServerInfo, respond};
use gnomon_load::{Abuser, Invalid, Kiss, RampPlan, ReplyKind, RunConfig, RunError, Shape, run};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// What a scripted server sends back for the i-th request it read, from which socket.
enum Out {
    Main(Vec<u8>),
    Other(Vec<u8>),
}

struct FakeServer {
    addr: SocketAddrV4,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<BTreeSet<Ipv4Addr>>>,
}

impl FakeServer {
    /// Serves until dropped (or 200 000 requests), returning the source addresses it saw.
    fn start(script: impl Fn(u64, &[u8], SocketAddr) -> Vec<Out> + Send + 'static) -> FakeServer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let addr = match sock.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = thread::spawn(move || {
            let mut sources = BTreeSet::new();
            let mut buf = [0u8; 512];
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) && i < 200_000 {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let SocketAddr::V4(f) = from {
                    sources.insert(*f.ip());
                }
                for out in script(i, &buf[..n], from) {
                    match out {
                        Out::Main(b) => sock.send_to(&b, from).unwrap(),
                        Out::Other(b) => other.send_to(&b, from).unwrap(),
                    };
                }
                i += 1;
            }
            sources
        });
        FakeServer {
            addr,
            stop,
            handle: Some(handle),
        }
    }

    fn sources(mut self) -> BTreeSet<Ipv4Addr> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn now() -> NtpTimestamp {
    NtpTimestamp::from_unix_nanos(realtime_ns() as i128)
}

fn info() -> ServerInfo {
    ServerInfo {
        leap: LeapIndicator::NoWarning,
        stratum: 1,
        precision: -20,
        root_delay: NtpShort::ZERO,
        root_dispersion: NtpShort(100),
        reference_id: RefId::ascii("GPS").unwrap(),
        reference_timestamp: now(),
    }
}

/// gnomon's reply rule with the current time as T2 and T3.
fn correct(req: &[u8]) -> Vec<u8> {
    let t = now();
    respond(req, &info(), t, t).unwrap().to_vec()
}

fn config(target: SocketAddrV4, rate: f64, packets: u64) -> RunConfig {
    RunConfig {
        target,
        shape: Shape::Fixed { rate },
        duration: Duration::from_secs(20),
        max_packets: packets,
        clients: 10,
        ports: 2,
        drain: Duration::from_millis(300),
        ring_bits: 12,
        ..RunConfig::default()
    }
}

#[test]
fn correct_server_low_rate_zero_invalid_zero_loss() {
    let server = FakeServer::start(|_, req, _| vec![Out::Main(correct(req))]);
    let cfg = RunConfig {
        clients: 50,
        ..config(server.addr, 500.0, 400)
    };
    let r = run(&cfg).unwrap();
    assert_eq!(r.sent, 400);
    assert_eq!(r.replies, 400);
    assert_eq!(r.good, 400);
    assert_eq!(r.invalid_total, 0, "{:?}", r.invalid);
    assert_eq!(r.loss_pct, 0.0);
    assert_eq!(r.stratum.get(&1), Some(&400));
    assert_eq!(r.leap, [400, 0, 0, 0]);
    assert_eq!(r.rtt_us.count, 400);
    assert!(r.rtt_us.p50 > 0.0 && r.rtt_us.p50 <= r.rtt_us.max);
    // One source address per client, all from the population's range.
    let sources = server.sources();
    assert_eq!(sources.len(), 50);
    assert!(sources.iter().all(|a| a.octets()[..2] == [127, 1]));
}

#[test]
fn each_kind_of_bad_reply_is_counted_by_reason() {
    const KINDS: u64 = 9;
    let server = FakeServer::start(|i, req, _| {
        let t = now();
        let good = respond(req, &info(), t, t).unwrap();
        let mut bad = good;
        match i % KINDS {
            0 => vec![Out::Main(good.to_vec())],
            1 => {
                // Origin that is no request of ours.
                bad[24] ^= 0x40;
                vec![Out::Main(bad.to_vec())]
            }
            2 => {
                bad[0] = (bad[0] & !7) | 5;
                vec![Out::Main(bad.to_vec())]
            }
            3 => {
                let t2 = t.add(NtpDuration::from_nanos(1_000_000));
                vec![Out::Main(respond(req, &info(), t2, t).unwrap().to_vec())]
            }
            4 => vec![Out::Main(good.to_vec()), Out::Main(good.to_vec())],
            5 => {
                let old = t.add(NtpDuration::from_seconds_f64(-10.0));
                vec![Out::Main(respond(req, &info(), old, old).unwrap().to_vec())]
            }
            6 => {
                bad[0] = (bad[0] & !0x38) | (3 << 3);
                vec![Out::Main(bad.to_vec())]
            }
            7 => {
                bad[1] = 0;
                bad[12..16].copy_from_slice(&RefId::RATE.0);
                vec![Out::Main(bad.to_vec())]
            }
            _ => vec![Out::Other(good.to_vec())],
        }
    });
    let per_kind = 12;
    let r = run(&config(server.addr, 300.0, KINDS * per_kind)).unwrap();
    assert_eq!(r.sent, KINDS * per_kind);
    assert_eq!(r.invalid_count(Invalid::Unmatched), per_kind);
    assert_eq!(r.invalid_count(Invalid::WrongMode), per_kind);
    assert_eq!(r.invalid_count(Invalid::TransmitBeforeReceive), per_kind);
    assert_eq!(r.invalid_count(Invalid::Duplicate), per_kind);
    assert_eq!(r.invalid_count(Invalid::OutOfBound), per_kind);
    assert_eq!(r.invalid_count(Invalid::WrongVersion), per_kind);
    assert_eq!(r.invalid_count(Invalid::WrongSource), per_kind);
    assert_eq!(r.invalid_count(Invalid::BadLength), 0);
    assert_eq!(r.kiss_count(Kiss::Rate), per_kind);
    // Good: the correct replies and the first copy of each duplicate.
    assert_eq!(r.good, 2 * per_kind);
    // Requests whose only reply was unmatched or came from the wrong address are lost.
    assert_eq!(r.replies, (KINDS - 2) * per_kind);
}

#[test]
fn echo_mode_matches_bytes() {
    let server = FakeServer::start(|i, req, _| {
        let mut b = req.to_vec();
        if i % 4 == 3 {
            b[2] ^= 1;
        }
        vec![Out::Main(b)]
    });
    let cfg = RunConfig {
        kind: ReplyKind::Echo,
        ..config(server.addr, 400.0, 200)
    };
    let r = run(&cfg).unwrap();
    assert_eq!(r.replies, 200);
    assert_eq!(r.good, 150);
    assert_eq!(r.invalid_count(Invalid::EchoMismatch), 50);
    assert_eq!(r.invalid_total, 50);
}

#[test]
fn abusers_get_their_own_rate_and_address() {
    let abuser = Ipv4Addr::new(127, 9, 9, 9);
    let server = FakeServer::start(move |_, req, from| {
        let mut b = correct(req);
        if from.ip() == abuser {
            b[1] = 0;
            b[12..16].copy_from_slice(&RefId::RATE.0);
        }
        vec![Out::Main(b)]
    });
    let cfg = RunConfig {
        abusers: vec![Abuser {
            addr: abuser,
            rate: 200.0,
        }],
        ..config(server.addr, 200.0, 200)
    };
    let r = run(&cfg).unwrap();
    assert_eq!(r.sent, 200);
    let (pop, ab) = (&r.streams[0], &r.streams[1]);
    assert_eq!(pop.sent + ab.sent, 200);
    // Equal rates: the abuser sends half, give or take a batch boundary.
    assert!(ab.sent >= 90 && ab.sent <= 110, "{}", ab.sent);
    assert_eq!(ab.kiss, ab.sent);
    assert_eq!(pop.kiss, 0);
    assert_eq!(r.kiss_count(Kiss::Rate), ab.sent);
    assert!(server.sources().contains(&abuser));
}

#[test]
fn ramp_that_loses_from_the_start_finds_no_rate() {
    // Answers every other request: 50 % loss at any rate.
    let server = FakeServer::start(|i, req, _| {
        if i % 2 == 0 {
            vec![Out::Main(correct(req))]
        } else {
            vec![]
        }
    });
    let cfg = RunConfig {
        shape: Shape::Ramp(RampPlan {
            start: 500.0,
            factor: 2.0,
            add: None,
            step_duration: Duration::from_millis(200),
            max_loss: 0.01,
            refine: 2,
            retries: 0,
        }),
        ..config(server.addr, 0.0, 5000)
    };
    let r = run(&cfg).unwrap();
    let ramp = r.ramp.as_ref().unwrap();
    assert_eq!(ramp.max_rate, 0.0);
    assert_eq!(ramp.first_failing_rate, Some(250.0 / 2.0));
    assert_eq!(ramp.ended_by, "loss");
    // The start, then two bisections toward zero.
    let offered: Vec<f64> = r.steps.iter().map(|s| s.offered_rate.unwrap()).collect();
    assert_eq!(offered, [500.0, 250.0, 125.0]);
    assert!(r.steps.iter().all(|s| s.loss_pct > 40.0));
    assert!(r.svg().contains("<polyline"));
}

#[test]
fn ramp_against_a_good_server_climbs_until_its_budget() {
    let server = FakeServer::start(|_, req, _| vec![Out::Main(correct(req))]);
    let cfg = RunConfig {
        shape: Shape::Ramp(RampPlan {
            start: 200.0,
            factor: 2.0,
            add: None,
            step_duration: Duration::from_millis(100),
            max_loss: 0.01,
            refine: 0,
            retries: 0,
        }),
        ..config(server.addr, 0.0, 100)
    };
    let r = run(&cfg).unwrap();
    let ramp = r.ramp.as_ref().unwrap();
    assert_eq!(ramp.ended_by, "budget");
    assert_eq!(r.sent, 100);
    assert_eq!(r.invalid_total, 0);
    // About 20 + 40 packets at 200 and 400/s; the third step (800/s) is cut by the budget.
    let offered: Vec<f64> = r.steps.iter().map(|s| s.offered_rate.unwrap()).collect();
    assert_eq!(offered[..2], [200.0, 400.0]);
    assert_eq!(ramp.max_rate, 400.0);
}

#[test]
fn a_ramp_step_lost_to_one_burst_is_measured_again() {
    // Drops requests 300..400 only: the third step (2000/s, requests 300..700) loses a quarter,
    // its retry none.
    let server = FakeServer::start(|i, req, _| {
        if (300..400).contains(&i) {
            vec![]
        } else {
            vec![Out::Main(correct(req))]
        }
    });
    let plan = RampPlan {
        start: 500.0,
        factor: 2.0,
        add: None,
        step_duration: Duration::from_millis(200),
        max_loss: 0.01,
        refine: 0,
        retries: 1,
    };
    let cfg = RunConfig {
        shape: Shape::Ramp(plan),
        ..config(server.addr, 0.0, 1500)
    };
    let r = run(&cfg).unwrap();
    let ramp = r.ramp.as_ref().unwrap();
    let offered: Vec<f64> = r.steps.iter().map(|s| s.offered_rate.unwrap()).collect();
    assert_eq!(offered[..4], [500.0, 1000.0, 2000.0, 2000.0], "{offered:?}");
    assert!(r.steps[2].loss_pct > 20.0, "{}", r.steps[2].loss_pct);
    assert!(r.steps[3].loss_pct < 1.0, "{}", r.steps[3].loss_pct);
    assert!(ramp.max_rate >= 2000.0, "{}", ramp.max_rate);
}

#[test]
fn remote_targets_are_refused() {
    let cfg = config(SocketAddrV4::new(Ipv4Addr::new(192, 0, 2, 1), 123), 10.0, 10);
    assert!(matches!(run(&cfg), Err(RunError::RemoteTarget(_))));
}

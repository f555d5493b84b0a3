//! A leap second end to end, over loopback: a fake upstream whose clock reads a few seconds
//! before the end of 2016-12-31 and announces LI 1, then inserts 23:59:60 (its clock goes back a
//! second at midnight); gnomon in software mode (the machine's clock is never touched) follows
//! it, and a plain UDP client sees LI 1 before midnight, 23:59:59 served twice, and LI 0 after.

mod common;

use common::{Gnomon, client, exchange, fake_answer_with, request, udp_server};
use gnomon::clock::realtime_ns;
use gnomon::proto::{Header, LeapIndicator};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

const NS: i64 = 1_000_000_000;
/// 2017-01-01 00:00:00 UTC.
const MIDNIGHT: i64 = 1_483_228_800 * NS;
/// The upstream starts this long before midnight: time to start, synchronise (1 s polls, 3
/// samples) and serve LI 1 for a while, with room to spare on a loaded machine.
const LEAD_NS: i64 = 20 * NS;

#[test]
fn a_leap_second_is_announced_inserted_and_cleared() {
    let start = realtime_ns();
    // The upstream's clock: seconds since the start, from LEAD before midnight; UTC repeats
    // 23:59:59 once its continuous count passes midnight.
    let (port, upstream) = {
        let stop = Arc::new(AtomicBool::new(false));
        let clock = move || {
            let t = MIDNIGHT - LEAD_NS + (realtime_ns() - start);
            match t >= MIDNIGHT {
                true => (t - NS, LeapIndicator::NoWarning),
                false => (t, LeapIndicator::AddSecond),
            }
        };
        let (port, h) = udp_server(stop.clone(), fake_answer_with(clock));
        (port, (stop, h))
    };
    // Ten years back is far over the panic threshold: the operator allows the first correction.
    let srv = Gnomon::start(&format!(
        "[[upstream]]\naddress = \"127.0.0.1\"\nport = {port}\nminpoll = 0\nmaxpoll = 0\n\
         [makestep]\nallow_large_first = true\n"
    ));
    let sock = client(srv.addr());
    // (local realtime, served time, LI) every 100 ms until 3 s after the upstream's leap.
    let mut seen: Vec<(i64, i64, u8)> = Vec::new();
    let end = start + LEAD_NS + 4 * NS;
    let deadline = Instant::now() + Duration::from_secs(50);
    let mut transmit = 1u64;
    let mut status = String::new();
    while realtime_ns() < end && Instant::now() < deadline {
        transmit += 1;
        let sent = realtime_ns();
        let reply = exchange(&sock, srv.addr(), &request(4, 3, transmit));
        let received = realtime_ns();
        // Only the reply to this request (a late one to an earlier request is another's), and
        // only a quick one, so that its local time is known to a few milliseconds.
        if let Some(h) = reply.and_then(|r| Header::decode(&r).ok())
            && h.origin_timestamp.0 == transmit
            && received - sent < 50_000_000
        {
            let served = h.transmit_timestamp.to_unix_nanos(MIDNIGHT / NS) as i64;
            seen.push((sent + (received - sent) / 2, served, h.leap as u8));
            if h.leap == LeapIndicator::AddSecond && status.is_empty() {
                status = String::from_utf8_lossy(&srv.ctl(&["status"]).stdout).to_string();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log: Vec<String> = std::iter::from_fn(|| srv.log.try_recv().ok()).collect();
    // Dropped, not stopped: a clean shutdown is not what this test is about (a worker was seen
    // here to sit in its receive past the 100 ms read timeout at shutdown, now and then).
    drop(srv);
    upstream.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = upstream.1.join();
    let synced: Vec<&(i64, i64, u8)> = seen.iter().filter(|s| s.2 != 3).collect();
    let show = || {
        seen.iter()
            .map(|(l, t, li)| {
                format!(
                    "{:+.3} {} LI {li}",
                    (l - start) as f64 * 1e-9,
                    gnomon::sync::leap::utc_text(t.div_euclid(NS))
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(synced.len() > 50, "synchronised replies: {}\n{}", synced.len(), show());
    // Served time minus local time between replies: steady but for one step of a second back.
    let steps: Vec<(usize, i64)> = synced
        .windows(2)
        .enumerate()
        .map(|(i, w)| (i + 1, (w[1].1 - w[1].0) - (w[0].1 - w[0].0)))
        .filter(|&(_, d)| d.abs() > 200_000_000)
        .collect();
    assert_eq!(steps.len(), 1, "one step expected: {steps:?}\n{}", show());
    let (k, step) = steps[0];
    assert!((step + NS).abs() < 200_000_000, "the step is -1 s: {step}\n{}", show());
    // It happens as served time reaches midnight: 23:59:59 is served twice.
    let (before, after) = (synced[k - 1], synced[k]);
    assert!(before.1 >= MIDNIGHT - 300_000_000 && before.1 < MIDNIGHT, "{}", show());
    assert!(after.1 < MIDNIGHT && after.1 >= MIDNIGHT - NS, "{}", show());
    // LI 1 on the last day before it (from the first synchronised reply), LI 0 after.
    assert!(synced[..k].iter().all(|s| s.2 == 1), "LI before the leap\n{}", show());
    assert!(k >= 5, "LI 1 served for a while before midnight\n{}", show());
    assert!(synced[k..].iter().all(|s| s.2 == 0), "LI after the leap\n{}", show());
    assert!(synced[k..].iter().any(|s| s.1 >= MIDNIGHT + NS), "{}", show());
    assert!(
        status.contains(
            "Leap second     : insert 23:59:60 after 2016-12-31 23:59:59 UTC (announced by the majority of \
             selected sources)"
        ),
        "{status}"
    );
    assert!(
        log.iter().any(|l| l.contains("leap second announced: insert second")),
        "{log:#?}"
    );
    assert!(
        log.iter().any(|l| l.contains("leap second applied: 23:59:60 inserted")),
        "{log:#?}"
    );
}

//! The same end-to-end checks against both I/O backends: correct replies on IPv4 and IPv6,
//! replies from the asked address, per-core counters and the latency histogram in `gnomon stats`.

mod common;
use common::*;
use gnomon::proto::{Header, LeapIndicator, Mode, NtpTimestamp};

/// How many io_uring instances a process holds open.
fn io_uring_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains("io_uring"))
        .count()
}

#[test]
fn both_backends_answer_count_and_measure() {
    for (io, name) in backends() {
        let srv = Gnomon::start(&format!(
            "io = \"{io}\"\nworkers = 2\nlisten = [\"127.0.0.1:0\", \"[::1]:0\"]\nlocal_stratum = 2\n"
        ));
        let mut answered = 0u64;
        for &addr in &srv.addrs {
            // Several client sockets, so the reuseport group spreads them over both workers.
            for c in 0..4u64 {
                let sock = client(addr);
                for i in 0..25u64 {
                    let tx = (c << 32) | i;
                    let r = exchange(&sock, addr, &request(4, 3, tx)).unwrap_or_else(|| panic!("{io}: no reply"));
                    let h = Header::decode(&r).unwrap();
                    assert_eq!(r.len(), 48);
                    assert_eq!(h.mode, Mode::Server, "{io}");
                    assert_eq!(h.leap, LeapIndicator::NoWarning, "{io}");
                    assert_eq!(h.stratum, 2, "{io}");
                    assert_eq!(h.origin_timestamp, NtpTimestamp(tx), "{io}");
                    assert!(h.transmit_timestamp.since(h.receive_timestamp).0 >= 0, "{io}: T3 < T2");
                    answered += 1;
                }
            }
            // Bad input is counted, not answered.
            let sock = client(addr);
            assert!(
                exchange(&sock, addr, &request(4, 6, 1)).is_none(),
                "{io}: mode 6 answered"
            );
            assert!(
                exchange(&sock, addr, &[0x23; 20]).is_none(),
                "{io}: short packet answered"
            );
        }
        assert_eq!(srv.wait_counter("drop_too_short", 2), 2, "{io}");
        srv.wait_counter("answered", answered);
        let s = srv.stats();
        assert_eq!(s["total"]["backend"], name, "{io}");
        // The label is not enough: the io_uring backend must really hold an io_uring.
        assert_eq!(
            io_uring_fds(srv.child.id()) > 0,
            io != "mmsg",
            "{io}: io_uring fds in the server"
        );
        assert_eq!(s["total"]["counters"]["answered"].as_u64(), Some(answered), "{io}");
        assert_eq!(s["total"]["counters"]["received"].as_u64(), Some(answered + 4), "{io}");
        assert_eq!(s["total"]["counters"]["drop_control_mode"].as_u64(), Some(2), "{io}");
        let workers = s["workers"].as_array().unwrap();
        assert_eq!(workers.len(), 2);
        let per_worker: u64 = workers
            .iter()
            .map(|w| w["counters"]["answered"].as_u64().unwrap())
            .sum();
        assert_eq!(per_worker, answered, "{io}: per-worker counters do not add up");
        // Every answered request has a latency sample: kernel receive timestamp to T3.
        let lat = &s["total"]["latency"];
        assert_eq!(lat["count"].as_u64(), Some(answered), "{io}");
        let (p50, p99, max) = (
            lat["p50_ns"].as_u64().unwrap(),
            lat["p99_ns"].as_u64().unwrap(),
            lat["max_ns"].as_u64().unwrap(),
        );
        assert!(p50 > 0 && p50 <= p99 && p99 <= max, "{io}: {lat}");
        assert!(s["total"]["batch_mean"].as_f64().unwrap() >= 1.0);
        let text = srv.ctl(&["stats"]);
        let text = String::from_utf8_lossy(&text.stdout).to_string();
        assert!(text.contains(&format!("backend {name}")), "{text}");
        assert!(
            text.contains("p99 us") && text.lines().any(|l| l.starts_with("total")),
            "{text}"
        );
    }
}

#[test]
fn both_backends_reply_from_the_asked_address() {
    for (io, _) in backends() {
        let srv = Gnomon::start(&format!(
            "io = \"{io}\"\nlisten = [\"0.0.0.0:0\", \"[::]:0\"]\nlocal_stratum = 2\n"
        ));
        let (p4, p6) = (srv.addrs[0].port(), srv.addrs[1].port());
        for target in [
            format!("127.0.0.1:{p4}"),
            format!("127.0.4.9:{p4}"),
            format!("[::1]:{p6}"),
        ] {
            let target: std::net::SocketAddr = target.parse().unwrap();
            let sock = client(target);
            sock.send_to(&request(4, 3, 5), target).unwrap();
            let mut buf = [0u8; 100];
            let (n, from) = sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("{io} {target}: {e}"));
            assert_eq!(n, 48);
            assert_eq!(from, target, "{io}: reply from the wrong address");
        }
    }
}

/// Per-worker `received` counters.
fn per_worker_received(srv: &Gnomon) -> Vec<u64> {
    srv.stats()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["counters"]["received"].as_u64().unwrap())
        .collect()
}

#[test]
fn source_steering_keeps_each_client_on_one_worker() {
    for (io, _) in backends() {
        let srv = Gnomon::start(&format!(
            "io = \"{io}\"\nworkers = 2\nsteering = \"source\"\nlocal_stratum = 2\n"
        ));
        let port = srv.addr().port();
        let target: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut workers_used = std::collections::BTreeSet::new();
        let mut total = 0u64;
        for host in 1..=6u8 {
            let before = per_worker_received(&srv);
            // Ten source ports from one source address: the kernel's hash would split them.
            for _ in 0..10 {
                let sock = std::net::UdpSocket::bind(format!("127.0.9.{host}:0")).unwrap();
                sock.set_read_timeout(Some(std::time::Duration::from_millis(300)))
                    .unwrap();
                assert!(exchange(&sock, target, &request(4, 3, 1)).is_some(), "{io}: no reply");
            }
            total += 10;
            srv.wait_counter("received", total);
            let after = per_worker_received(&srv);
            let grew: Vec<usize> = (0..after.len()).filter(|&w| after[w] > before[w]).collect();
            assert_eq!(
                grew.len(),
                1,
                "{io}: 127.0.9.{host} reached workers {grew:?} ({before:?} -> {after:?})"
            );
            assert_eq!(after[grew[0]] - before[grew[0]], 10);
            workers_used.insert(grew[0]);
        }
        // Six addresses over two workers: both get some.
        assert_eq!(workers_used.len(), 2, "{io}: steering sent every client to one worker");
    }
}

//! Upstream sync end to end: `gnomon serve` with three Debian `chronyd` stratum-1 servers
//! (`local stratum 1`, `-x` so they never touch the clock) and one fake server 1 s ahead as
//! upstreams. `gnomon sources` shows '*' on a chronyd and 'x' (falseticker) on the fake, a real
//! chronyd client sees gnomon at stratum 2 with refid 127.0.0.1, and a stopped chronyd shows up
//! as unreachable with the reason. Plus the LOCAL clock, the unsynchronised default and the
//! refusal of `clock_mode = "system"`.

mod common;
use common::*;
use gnomon::clock::{ClockState, realtime_ns, snapshot};
use gnomon::proto::{Header, LeapIndicator, NtpTimestamp, RefId, respond};
use gnomon::sync::{SyncConfig, spawn};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One row of `gnomon sources --json`.
fn row(v: &serde_json::Value, port: u16) -> &serde_json::Value {
    v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["addr"] == format!("127.0.0.1:{port}"))
        .unwrap()
}

fn sources_json(srv: &Gnomon) -> serde_json::Value {
    let out = srv.ctl(&["sources", "--json"]);
    serde_json::from_slice(&out.stdout).expect("sources json")
}

fn wait_json(srv: &Gnomon, what: &str, limit: Duration, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let v = sources_json(srv);
        if ok(&v) {
            return v;
        }
        if start.elapsed() > limit {
            let text = srv.ctl(&["sources", "--why"]);
            panic!(
                "timed out waiting for {what}:\n{}",
                String::from_utf8_lossy(&text.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The whole chain with the real binary: three chronyd stratum-1 servers and a wrong one
/// upstream, `gnomon serve` syncing to them, `gnomon sources` showing who is used and why not,
/// and a real chronyd client seeing gnomon as stratum 2 with refid 127.0.0.1.
#[test]
fn gnomon_serve_syncs_to_chronyd_and_serves_stratum_2() {
    if !have_tool(CHRONYD) {
        return;
    }
    let dir = tempdir("sync-e2e");
    let mut servers: Vec<Chronyd> = (0..3).map(|i| start_chronyd(&dir, i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (fake_port, fake) = fake_server(1, stop.clone());
    let mut cfg = String::new();
    for p in servers.iter().map(|s| s.port).chain([fake_port]) {
        cfg.push_str(&format!(
            "[[upstream]]\naddress = \"127.0.0.1\"\nport = {p}\niburst = true\nminpoll = 0\nmaxpoll = 0\n\n"
        ));
    }
    let srv = Gnomon::start(&cfg);
    let v = wait_json(
        &srv,
        "a chronyd as system peer, the fake as falseticker",
        Duration::from_secs(40),
        |v| {
            v["system"]["synced"] == true
                && v["sources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|s| s["tally"] == "*")
                    .count()
                    == 1
                && row(v, fake_port)["tally"] == "x"
        },
    );
    let peer = v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["tally"] == "*")
        .unwrap()
        .clone();
    assert_ne!(peer["addr"], format!("127.0.0.1:{fake_port}"));
    assert!(
        row(&v, fake_port)["why"].as_str().unwrap().contains("falseticker"),
        "{v}"
    );
    assert_eq!(v["system"]["stratum"], 2);
    assert_eq!(v["system"]["refid"], "127.0.0.1");
    // The text views an operator reads.
    let text = srv.ctl(&["sources", "--why"]);
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(text.lines().any(|l| l.starts_with('*')), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with('x') && l.contains("falseticker")),
        "{text}"
    );
    let status = srv.ctl(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("127.0.0.1"),
        "{}",
        String::from_utf8_lossy(&status.stdout)
    );

    // A real client of gnomon: chronyd -Q accepts the time, and chronyd's measurement log shows
    // stratum 2 and refid 127.0.0.1 (7F000001).
    let client_dir = tempdir("sync-e2e-client");
    let out = chrony_client(srv.addr(), &client_dir, 10);
    let wrong = chrony_offset(&out).unwrap_or_else(|| panic!("chronyd -Q got no usable reply:\n{out}"));
    assert!(wrong.abs() < 0.01, "chronyd -Q sees gnomon off by {wrong} s");
    let meas = chrony_measurements(srv.addr(), &client_dir);
    assert!(!meas.is_empty(), "no measurement of gnomon by chronyd");
    for m in &meas {
        let f: Vec<&str> = m.split_whitespace().collect();
        assert_eq!((f[3], f[4]), ("N", "2"), "leap/stratum in {m}");
        assert!(m.contains("7F000001"), "refid in {m}");
    }

    // Stop the system peer's chronyd: it shows as unreachable with the reason, and gnomon stays
    // synced on the other two.
    let victim = servers
        .iter()
        .position(|s| peer["addr"] == format!("127.0.0.1:{}", s.port))
        .unwrap();
    let victim_port = servers[victim].port;
    drop(servers.remove(victim));
    let v = wait_json(
        &srv,
        "the stopped chronyd to show as unreachable",
        Duration::from_secs(40),
        |v| {
            row(v, victim_port)["why"]
                .as_str()
                .is_some_and(|w| w.contains("unreachable (no reply to"))
        },
    );
    assert_eq!(row(&v, victim_port)["reach"], 0);
    assert_eq!(v["system"]["synced"], true);
    stop.store(true, Ordering::Relaxed);
    fake.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&client_dir);
}

#[test]
fn local_stratum_without_upstreams_and_unsynchronised_without_either() {
    let (publisher, reader) = snapshot(ClockState::unsynchronized(-20));
    let stop = Arc::new(AtomicBool::new(false));
    let config = SyncConfig {
        local_stratum: Some(3),
        ..SyncConfig::default()
    };
    let h = spawn(config, publisher, -20, stop.clone()).unwrap();
    let s = reader.load();
    let info = s.server_info(realtime_ns());
    assert_eq!(
        (info.stratum, info.reference_id, info.leap),
        (3, RefId::LOCL, LeapIndicator::NoWarning)
    );
    assert_eq!(s.offset_ns, 0);
    let r = h.report();
    assert!(r.system.synced);
    // As `gnomon query` shows a stratum-3 reply with refid LOCL.
    assert_eq!(r.system.refid, "76.79.67.76 (LOCL)");
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();

    let (publisher, reader) = snapshot(ClockState::unsynchronized(-20));
    let stop = Arc::new(AtomicBool::new(false));
    let h = spawn(SyncConfig::default(), publisher, -20, stop.clone()).unwrap();
    assert!(!reader.load().is_synchronized());
    let r = h.report();
    assert!(!r.system.synced);
    assert!(r.system.why_unsynced.unwrap().contains("no upstream"));
    // A header decoded from the published state says LI 3.
    let reply = respond(
        &{
            let mut b = [0u8; 48];
            b[0] = 0x23;
            b
        },
        &reader.load().server_info(realtime_ns()),
        NtpTimestamp(1),
        NtpTimestamp(2),
    )
    .unwrap();
    assert_eq!(Header::decode(&reply).unwrap().leap, LeapIndicator::Unsynchronized);
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
}

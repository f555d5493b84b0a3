//! End-to-end over loopback: real NTP clients (chronyd, ntpdig) against `gnomon serve`, the
//! bad-input corpus, reply sizes, clean shutdown and the CLI's config errors.

mod common;
use common::*;
use gnomon::proto::{Header, LeapIndicator, Mode, NtpTimestamp, RefId};
use std::process::Command;
use std::time::Duration;

const NTPDIG: &str = "/usr/bin/ntpdig";

#[test]
fn chronyd_accepts_local_stratum_server() {
    if !have_tool(CHRONYD) {
        return;
    }
    let srv = Gnomon::start("local_stratum = 3\n");
    let dir = tempdir("chrony");
    let out = chrony_client(srv.addr(), &dir, 10);
    let offset = chrony_offset(&out).unwrap_or_else(|| panic!("no offset:\n{out}"));
    // Same machine, same clock: the measured offset is tiny.
    assert!(offset.abs() < 0.01, "offset {offset}");
    let meas = chrony_measurements(srv.addr(), &dir);
    assert!(!meas.is_empty(), "chronyd logged no measurement");
    for m in &meas {
        let f: Vec<&str> = m.split_whitespace().collect();
        // Date Time IP L St 123 567 ABCD ...
        assert_eq!(f[3], "N", "leap status in {m}");
        assert_eq!(f[4], "3", "stratum in {m}");
        assert_eq!(
            (f[5], f[6], f[7]),
            ("111", "111", "1111"),
            "chrony's packet tests in {m}"
        );
        // Refid column: "LOCL" as hex.
        assert!(m.contains("4C4F434C"), "refid in {m}");
    }
}

#[test]
fn ntpdig_accepts_local_stratum_server() {
    if !have_tool(NTPDIG) {
        return;
    }
    if !is_root() {
        skip("ntpdig only talks to port 123, which needs root");
        return;
    }
    let ip = own_loopback().to_string();
    let srv = Gnomon::start(&format!("listen = [\"{ip}:123\"]\nlocal_stratum = 4\n"));
    let (ok, out) = run_bounded(
        Command::new(NTPDIG).args(["-j", "-t", "2", &ip]),
        Duration::from_secs(10),
    );
    assert!(ok, "ntpdig failed:\n{out}");
    let v: serde_json::Value =
        serde_json::from_str(out.lines().find(|l| l.starts_with('{')).expect("json line")).unwrap();
    assert_eq!(v["stratum"], 4);
    assert_eq!(v["leap"], "no-leap");
    assert!(v["offset"].as_f64().unwrap().abs() < 0.01, "{out}");
    assert!(v["time"].as_str().unwrap().starts_with("20"), "{out}");
    drop(srv);
}

#[test]
fn unsynchronised_server_is_rejected_by_real_clients() {
    let ip = own_loopback().to_string();
    let srv = Gnomon::start(&format!("listen = [\"{ip}:123\", \"127.0.0.1:0\"]\n"));
    let port_any = srv.addrs[1];
    // What the reply says: LI 3 and stratum 0 (RFC 5905 section 7.3: 16 is sent as 0), refid INIT.
    let sock = client(port_any);
    let r = Header::decode(&exchange(&sock, port_any, &request(4, 3, 77)).expect("reply")).unwrap();
    assert_eq!(r.leap, LeapIndicator::Unsynchronized);
    assert_eq!(r.stratum, 0);
    assert_eq!(r.reference_id, RefId::INIT);
    // gnomon query reports it, with exit status 3.
    let q = Command::new(GNOMON)
        .args(["query", &port_any.to_string()])
        .output()
        .unwrap();
    assert_eq!(q.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&q.stdout).contains("unsynchronised"));

    if have_tool(CHRONYD) {
        let dir = tempdir("chrony-unsync");
        let out = chrony_client(port_any, &dir, 6);
        assert!(
            chrony_offset(&out).is_none(),
            "chronyd used an unsynchronised server:\n{out}"
        );
        assert!(
            out.contains("Timeout reached") || out.contains("No suitable source"),
            "{out}"
        );
        // chronyd discards such replies before its measurement stage: nothing is logged.
        assert!(chrony_measurements(port_any, &dir).is_empty());
    }
    if have_tool(NTPDIG) && is_root() {
        let (ok, out) = run_bounded(
            Command::new(NTPDIG).args(["-d", "-t", "2", &ip]),
            Duration::from_secs(10),
        );
        assert!(!ok, "ntpdig accepted an unsynchronised server:\n{out}");
        // ntpdig checks the stratum before the leap bits; an unsynchronised server sends 0.
        assert!(out.contains("Response dropped: stratum 0"), "{out}");
    }
}

#[test]
fn bad_input_is_dropped_counted_and_never_answered() {
    let srv = Gnomon::start("local_stratum = 2\n");
    let addr = srv.addr();
    let sock = client(addr);
    let corpus = bad_input_corpus();
    let mut expected = std::collections::BTreeMap::<&str, u64>::new();
    for (bytes, reason) in &corpus {
        sock.send_to(bytes, addr).unwrap();
        *expected.entry(reason).or_default() += 1;
    }
    // Nothing comes back for any of it.
    let mut buf = [0u8; 2048];
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    assert!(sock.recv_from(&mut buf).is_err(), "the server answered bad input");
    srv.wait_counter("received", corpus.len() as u64);
    let stats = srv.stats();
    for (reason, n) in &expected {
        assert_eq!(
            stats["total"]["counters"][*reason].as_u64(),
            Some(*n),
            "counter {reason}"
        );
    }
    assert_eq!(stats["total"]["counters"]["answered"].as_u64(), Some(0));
    // And a valid request right after is answered.
    let r = exchange(&sock, addr, &request(4, 3, 0xdead_beef)).expect("valid request answered");
    let h = Header::decode(&r).unwrap();
    assert_eq!(h.origin_timestamp, NtpTimestamp(0xdead_beef));
    assert_eq!(h.mode, Mode::Server);
    assert_eq!(h.stratum, 2);
    // The text view shows the same reasons.
    let text = srv.ctl(&["stats"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("drop_control_mode"), "{text}");
}

#[test]
fn reply_is_never_longer_than_request() {
    let srv = Gnomon::start("local_stratum = 2\n");
    let addr = srv.addr();
    let sock = client(addr);
    for len in [48usize, 49, 52, 60, 68, 120, 200, 512, 1024] {
        let mut req = request(4, 3, len as u64);
        req.resize(len, 0x5a);
        let r = exchange(&sock, addr, &req).unwrap_or_else(|| panic!("no reply to a {len}-byte request"));
        assert!(r.len() <= len, "{} bytes answered {len}", r.len());
        assert_eq!(r.len(), 48);
        assert_eq!(Header::decode(&r).unwrap().origin_timestamp, NtpTimestamp(len as u64));
    }
}

#[test]
fn versions_one_to_four_are_answered_with_their_version() {
    let srv = Gnomon::start("local_stratum = 2\n");
    let addr = srv.addr();
    let sock = client(addr);
    for v in 1..=4u8 {
        let h = Header::decode(&exchange(&sock, addr, &request(v, 3, v as u64)).unwrap()).unwrap();
        assert_eq!(h.version, v);
        assert!(h.transmit_timestamp.since(h.receive_timestamp).0 >= 0, "T3 before T2");
    }
    // NTPv1 had no mode field: mode 0 with version 1 is a client.
    assert!(exchange(&sock, addr, &request(1, 0, 9)).is_some());
}

#[test]
fn serves_ipv6_and_two_workers() {
    let srv = Gnomon::start("listen = [\"127.0.0.1:0\", \"[::1]:0\"]\nworkers = 2\nlocal_stratum = 5\n");
    for &addr in &srv.addrs {
        let sock = client(addr);
        for i in 0..20u64 {
            let h = Header::decode(&exchange(&sock, addr, &request(4, 3, i)).expect("reply")).unwrap();
            assert_eq!(h.stratum, 5);
            assert_eq!(h.origin_timestamp, NtpTimestamp(i));
        }
    }
    let stats = srv.stats();
    assert_eq!(stats["workers"].as_array().unwrap().len(), 2);
    srv.wait_counter("answered", 40);
    assert_eq!(srv.counter("answered"), 40);
}

#[test]
fn replies_leave_from_the_address_the_request_came_to() {
    // Bound to the wildcard, asked on two different loopback addresses.
    let srv = Gnomon::start("listen = [\"0.0.0.0:0\"]\nlocal_stratum = 2\n");
    let port = srv.addr().port();
    for dst in ["127.0.0.1", "127.0.3.7"] {
        let target: std::net::SocketAddr = format!("{dst}:{port}").parse().unwrap();
        let sock = client(target);
        sock.send_to(&request(4, 3, 1), target).unwrap();
        let mut buf = [0u8; 100];
        let (_, from) = sock.recv_from(&mut buf).expect("reply");
        assert_eq!(from, target, "reply came from the wrong address");
    }
}

#[test]
fn stops_cleanly_on_sigterm() {
    let mut srv = Gnomon::start("");
    let st = srv.stop();
    assert!(st.success(), "exit status {st:?}");
    let lines: Vec<String> = srv.log.try_iter().collect();
    assert!(lines.iter().any(|l| l.contains("stopped")), "{lines:?}");
    assert!(!srv.control.exists(), "control socket left behind");
}

#[test]
fn check_config_names_file_line_and_key() {
    let dir = tempdir("cfg");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "workers = 1\nlocal_stratum = 99\n").unwrap();
    let out = Command::new(GNOMON).arg("check-config").arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:2: key `local_stratum`", bad.display())),
        "{err}"
    );
    let good = dir.join("good.toml");
    std::fs::write(&good, "listen = [\"127.0.0.1:123\"]\nlocal_stratum = 10\n").unwrap();
    assert!(
        Command::new(GNOMON)
            .arg("check-config")
            .arg(&good)
            .status()
            .unwrap()
            .success()
    );
    // The shipped file (also the embedded default) is valid.
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/gnomon.toml");
    assert!(
        Command::new(GNOMON)
            .args(["check-config", shipped])
            .status()
            .unwrap()
            .success()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn help_and_version() {
    let out = Command::new(GNOMON).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("gnomon "));
    let out = Command::new(GNOMON).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "query", "check-config", "stats"] {
        assert!(help.contains(cmd), "{help}");
    }
}

/// Mode `system` steers the kernel clock, so without CAP_SYS_TIME the server must refuse to
/// start, saying why, rather than fail later. As root the capability is dropped with setpriv
/// (util-linux) for the child. The clock is never touched: the check comes before anything.
#[test]
fn system_clock_mode_without_cap_sys_time_is_refused() {
    let dir = tempdir("nocap");
    let conf = dir.join("system.toml");
    std::fs::write(
        &conf,
        format!(
            "listen = [\"127.0.0.1:{}\"]\ncontrol_socket = \"{}\"\nclock_mode = \"system\"\n\
             [[upstream]]\naddress = \"127.0.0.1\"\nport = {}\n",
            free_port(),
            dir.join("ctl").display(),
            free_port()
        ),
    )
    .unwrap();
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--bounding-set=-sys_time", "--inh-caps=-sys_time", "--", GNOMON]);
        c
    } else {
        Command::new(GNOMON)
    };
    cmd.arg("serve").arg("--config").arg(&conf);
    let (success, output) = run_bounded(&mut cmd, Duration::from_secs(10));
    assert!(
        !success && !output.contains("<killed"),
        "must exit at once, failing: {output}"
    );
    assert!(output.contains("clock mode \"system\" needs CAP_SYS_TIME"), "{output}");
    let _ = std::fs::remove_dir_all(dir);
}

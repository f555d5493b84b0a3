//! Loopback integration test of the sync thread against real upstreams: three Debian `chronyd`
//! instances as stratum-1 servers (`local stratum 1`, `-x` so they never touch the clock) and
//! one fake server 1 s ahead. Checks the sync thread selects a chronyd ('*', stratum 2), marks
//! the fake 'x' as a falseticker, that `chronyd -Q` accepts the time we would serve, and that a
//! stopped chronyd shows up as unreachable with the reason. Skipped when chronyd is missing.

use gnomon::clock::{ClockReader, ClockState, realtime_ns, snapshot};
use gnomon::proto::{Header, LeapIndicator, NtpShort, NtpTimestamp, RefId, ServerInfo, respond};
use gnomon::sync::{SyncConfig, SyncReport, UpstreamConfig, render_sources, render_status, spawn};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const CHRONYD: &str = "/usr/sbin/chronyd";

/// A child chronyd, killed (by its own pid) when dropped.
struct Chronyd {
    child: Child,
    port: u16,
}

impl Drop for Chronyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// A loopback UDP port nobody uses right now (a small race with other tests is acceptable).
fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gnomon-sync-chrony-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn chronyd_args(conf: &Path) -> Vec<String> {
    let mut a = vec!["-x".to_string(), "-f".to_string(), conf.display().to_string()];
    if is_root() {
        // Stay root: the compiled-in user may not own the temp files.
        a.extend(["-u".to_string(), "root".to_string()]);
    }
    a
}

fn start_chronyd(dir: &Path, i: usize) -> Chronyd {
    let port = free_port();
    let conf = dir.join(format!("server{i}.conf"));
    std::fs::write(
        &conf,
        format!(
            "local stratum 1\nallow 127.0.0.1\nport {port}\nbindaddress 127.0.0.1\ncmdport 0\npidfile {}\n",
            dir.join(format!("server{i}.pid")).display()
        ),
    )
    .unwrap();
    let child = Command::new(CHRONYD)
        .arg("-d")
        .args(chronyd_args(&conf))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chronyd");
    Chronyd { child, port }
}

/// A loopback UDP server thread: `answer` turns each datagram into the reply, if any.
fn udp_server(
    stop: Arc<AtomicBool>,
    answer: impl Fn(&[u8]) -> Option<[u8; 48]> + Send + 'static,
) -> (u16, JoinHandle<()>) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let port = sock.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf)
                && let Some(r) = answer(&buf[..n])
            {
                let _ = sock.send_to(&r, from);
            }
        }
    });
    (port, h)
}

/// Answers every client request with time `offset_s` ahead of the kernel clock, stratum 1.
fn fake_server(offset_s: i64, stop: Arc<AtomicBool>) -> (u16, JoinHandle<()>) {
    udp_server(stop, move |req| {
        let ts = || NtpTimestamp::from_unix_nanos((realtime_ns() + offset_s * 1_000_000_000).into());
        let info = ServerInfo {
            leap: LeapIndicator::NoWarning,
            stratum: 1,
            precision: -20,
            root_delay: NtpShort::ZERO,
            root_dispersion: NtpShort::from_seconds_ceil(1e-4),
            reference_id: RefId(*b"FAKE"),
            reference_timestamp: ts(),
        };
        respond(req, &info, ts(), ts()).ok()
    })
}

/// Serves the published snapshot like a worker would (one request at a time).
fn snapshot_server(reader: ClockReader, stop: Arc<AtomicBool>) -> (u16, JoinHandle<()>) {
    udp_server(stop, move |req| {
        let t2 = realtime_ns();
        let state: ClockState = reader.load();
        let t3 = realtime_ns();
        respond(req, &state.server_info(t3), state.ntp_time(t2), state.ntp_time(t3)).ok()
    })
}

fn wait_for(
    what: &str,
    limit: Duration,
    mut get: impl FnMut() -> SyncReport,
    ok: impl Fn(&SyncReport) -> bool,
) -> SyncReport {
    let start = Instant::now();
    loop {
        let r = get();
        if ok(&r) {
            return r;
        }
        assert!(
            start.elapsed() < limit,
            "timed out waiting for {what}:\n{}\n{}",
            render_sources(&r, true),
            render_status(&r)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn upstream(port: u16) -> UpstreamConfig {
    let mut u = UpstreamConfig::new("127.0.0.1");
    u.port = port;
    u.iburst = true;
    u.minpoll = 0;
    u.maxpoll = 0;
    u
}

fn source_addr(port: u16) -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], port)))
}

#[test]
fn syncs_to_chronyd_marks_fake_falseticker_and_reports_stopped_source() {
    if !Path::new(CHRONYD).exists() {
        eprintln!("SKIPPED: {CHRONYD} not installed");
        return;
    }
    let dir = tempdir("main");
    let mut servers: Vec<Chronyd> = (0..3).map(|i| start_chronyd(&dir, i)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (fake_port, fake) = fake_server(1, stop.clone());

    let config = SyncConfig {
        upstreams: servers
            .iter()
            .map(|s| upstream(s.port))
            .chain([upstream(fake_port)])
            .collect(),
        ..SyncConfig::default()
    };
    let (publisher, reader) = snapshot(ClockState::unsynchronized(-20));
    let sync_stop = Arc::new(AtomicBool::new(false));
    let handle = spawn(config, publisher, -20, sync_stop.clone()).expect("spawn sync thread");

    let r = wait_for(
        "a chronyd as system peer and the fake as falseticker",
        Duration::from_secs(30),
        || handle.report(),
        |r| {
            r.system.synced
                && r.sources.iter().filter(|s| s.tally == '*').count() == 1
                && r.sources
                    .iter()
                    .any(|s| s.addr == source_addr(fake_port) && s.tally == 'x')
        },
    );
    eprintln!("{}\n{}", render_sources(&r, true), render_status(&r));
    let peer = r.sources.iter().find(|s| s.tally == '*').unwrap();
    assert_ne!(peer.addr, source_addr(fake_port));
    assert_eq!(peer.stratum, 1);
    assert_eq!(r.system.stratum, 2);
    assert_eq!(r.system.refid, "127.0.0.1");
    let fake_row = r.sources.iter().find(|s| s.addr == source_addr(fake_port)).unwrap();
    assert!(fake_row.why.as_deref().unwrap().contains("falseticker"), "{fake_row:?}");
    assert!(fake_row.offset_ms.unwrap() > 900.0, "{fake_row:?}");
    // Everything shares one kernel clock, so the correction must be tiny.
    assert!(r.system.correction_s.abs() < 0.01, "{}", r.system.correction_s);

    // The published snapshot, as replies would carry it.
    let state = reader.load();
    let info = state.server_info(realtime_ns());
    assert_eq!(info.stratum, 2);
    assert_eq!(info.reference_id, RefId([127, 0, 0, 1]));

    // A real client accepts the time served from that snapshot.
    let serve_stop = Arc::new(AtomicBool::new(false));
    let (serve_port, server) = snapshot_server(reader.clone(), serve_stop.clone());
    let qconf = dir.join("client.conf");
    std::fs::write(
        &qconf,
        format!(
            "server 127.0.0.1 port {serve_port} iburst\ncmdport 0\npidfile {}\n",
            dir.join("client.pid").display()
        ),
    )
    .unwrap();
    let q = Command::new(CHRONYD)
        .args(["-Q", "-t", "10"])
        .args(chronyd_args(&qconf))
        .output()
        .expect("run chronyd -Q");
    let log = String::from_utf8_lossy(&q.stderr).to_string() + &String::from_utf8_lossy(&q.stdout);
    serve_stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("System clock wrong by"))
        .unwrap_or_else(|| panic!("chronyd -Q got no usable reply:\n{log}"));
    let wrong: f64 = line
        .split("wrong by ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(wrong.abs() < 0.01, "chronyd -Q sees gnomon off by {wrong} s");

    // Stop the system peer's chronyd: it must become unreachable, with the reason.
    let victim = servers.iter().position(|s| source_addr(s.port) == peer.addr).unwrap();
    let victim_port = servers[victim].port;
    drop(servers.remove(victim));
    let r = wait_for(
        "the stopped chronyd to show as unreachable",
        Duration::from_secs(40),
        || handle.report(),
        |r| {
            r.sources.iter().any(|s| {
                s.addr == source_addr(victim_port)
                    && s.why.as_deref().is_some_and(|w| w.contains("unreachable (no reply to"))
            })
        },
    );
    eprintln!("{}", render_sources(&r, true));
    let stopped = r.sources.iter().find(|s| s.addr == source_addr(victim_port)).unwrap();
    assert_eq!(stopped.reach, 0);
    assert_ne!(stopped.tally, '*');
    // The two remaining chronyds still outvote the fake.
    assert!(r.system.synced, "{}", render_status(&r));

    sync_stop.store(true, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    handle.join().unwrap();
    fake.join().unwrap();
    drop(servers);
    let _ = std::fs::remove_dir_all(&dir);
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
    assert_eq!(r.system.refid, "LOCL");
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

#[test]
fn system_mode_is_refused_with_a_clear_error() {
    let (publisher, _reader) = snapshot(ClockState::unsynchronized(-20));
    let config = SyncConfig {
        mode: gnomon::sync::ClockMode::System,
        ..SyncConfig::default()
    };
    let err = spawn(config, publisher, -20, Arc::new(AtomicBool::new(false)))
        .err()
        .expect("system mode must be refused");
    let msg = err.to_string();
    assert!(msg.contains("CAP_SYS_TIME") || msg.contains("not implemented"), "{msg}");
}

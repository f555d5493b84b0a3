//! gnomon under systemd: the unit and its system-clock drop-in pass `systemd-analyze verify` in a
//! scratch root holding the built binary, and `systemd-analyze security` scores both 2.5 or
//! better; the notification protocol (a fake `$NOTIFY_SOCKET` the test binds) gets READY=1 once
//! the server answers, STATUS= with the sync state, STOPPING=1, and WATCHDOG=1 pings that stop
//! while a worker is hung and resume when it runs again.

mod common;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ANALYZE: &str = "/usr/bin/systemd-analyze";
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

/// A root with the unit, the binary and the config where the unit expects them, plus the
/// host's target units (verify follows the unit's dependencies), and the drop-in if asked.
fn scratch_root(with_drop_in: bool) -> PathBuf {
    let root = tempdir("sdroot");
    let units = root.join("etc/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::copy(Path::new(DEPLOY).join("gnomon.service"), units.join("gnomon.service")).unwrap();
    if with_drop_in {
        let d = units.join("gnomon.service.d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(
            Path::new(DEPLOY).join("gnomon-system-clock.conf"),
            d.join("system-clock.conf"),
        )
        .unwrap();
    }
    for (dir, file, from) in [
        ("usr/bin", "gnomon", PathBuf::from(GNOMON)),
        ("etc/gnomon", "gnomon.toml", Path::new(DEPLOY).join("gnomon.toml")),
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        std::fs::copy(&from, root.join(dir).join(file)).unwrap();
    }
    let lib = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&lib).unwrap();
    for host in ["/usr/lib/systemd/system", "/lib/systemd/system"] {
        let Ok(entries) = std::fs::read_dir(host) else { continue };
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().ends_with(".target") {
                // Followed, not copied as links: they would point outside the root.
                let _ = std::fs::copy(e.path(), lib.join(&name));
            }
        }
        break;
    }
    root
}

fn analyze(args: &[&str], root: &Path) -> (bool, String) {
    let mut cmd = Command::new(ANALYZE);
    cmd.args(args)
        .arg(format!("--root={}", root.display()))
        .arg("gnomon.service");
    run_bounded(&mut cmd, Duration::from_secs(60))
}

/// The score from `systemd-analyze security`'s last line ("... exposure level for X: 1.6 OK").
fn exposure(out: &str) -> f64 {
    out.lines()
        .find_map(|l| l.split("exposure level for gnomon.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score in:\n{out}"))
}

#[test]
fn the_unit_and_its_drop_in_verify_and_score_at_most_2_5() {
    if !have_tool(ANALYZE) {
        return;
    }
    for drop_in in [false, true] {
        let root = scratch_root(drop_in);
        let what = if drop_in {
            "with gnomon-system-clock.conf"
        } else {
            "default (software mode)"
        };
        let (ok, out) = analyze(&["verify"], &root);
        assert!(ok && out.trim().is_empty(), "systemd-analyze verify, {what}:\n{out}");
        let (_, out) = analyze(&["security", "--offline=true", "--no-pager"], &root);
        let score = exposure(&out);
        eprintln!("systemd-analyze security, {what}: exposure {score}");
        assert!(score <= 2.5, "{what}: exposure {score}:\n{out}");
        let _ = std::fs::remove_dir_all(&root);
    }
}

/// The unit's settings as (section, key, value), in order.
fn settings(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut v = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line.to_string();
        } else if !line.starts_with('#')
            && let Some((k, val)) = line.split_once('=')
        {
            v.push((section.clone(), k.trim().to_string(), val.trim().to_string()));
        }
    }
    v
}

#[test]
fn only_the_system_clock_drop_in_grants_cap_sys_time_and_conflicts() {
    let unit = settings(&std::fs::read_to_string(Path::new(DEPLOY).join("gnomon.service")).unwrap());
    let get = |k: &str| {
        unit.iter()
            .filter(|e| e.1 == k)
            .map(|e| e.2.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("Type"), ["notify"]);
    assert_eq!(
        get("ExecReload"),
        ["/usr/bin/gnomon reload --control /run/gnomon/gnomon.sock"]
    );
    assert!(get("ExecStart")[0].starts_with("/usr/bin/gnomon serve"));
    assert_eq!(get("CapabilityBoundingSet"), ["CAP_NET_BIND_SERVICE"]);
    assert_eq!(get("AmbientCapabilities"), ["CAP_NET_BIND_SERVICE"]);
    assert_eq!(get("ProtectClock"), ["yes"]);
    assert!(
        get("Conflicts").is_empty(),
        "software mode leaves the host's own client running"
    );
    // The control socket ExecReload names is the shipped config's.
    let cfg = gnomon::config::Config::parse(
        &std::fs::read_to_string(Path::new(DEPLOY).join("gnomon.toml")).unwrap(),
        "gnomon.toml",
    )
    .unwrap();
    assert_eq!(cfg.control_socket, Path::new("/run/gnomon/gnomon.sock"));
    assert_eq!(cfg.sync.mode, gnomon::sync::ClockMode::Software);
    let drop_in = settings(&std::fs::read_to_string(Path::new(DEPLOY).join("gnomon-system-clock.conf")).unwrap());
    let get = |k: &str| {
        drop_in
            .iter()
            .filter(|e| e.1 == k)
            .map(|e| e.2.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("CapabilityBoundingSet"), ["CAP_SYS_TIME"]);
    assert_eq!(get("ProtectClock"), ["no"]);
    assert!(
        get("Conflicts")[0].contains("chrony.service") && get("Conflicts")[0].contains("systemd-timesyncd.service")
    );
}

/// A fake service manager: the datagram socket `$NOTIFY_SOCKET` names.
struct Manager {
    sock: UnixDatagram,
    env: String,
}

impl Manager {
    fn at_path(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Manager {
            sock,
            env: path.display().to_string(),
        }
    }

    fn abstract_name() -> Manager {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("gnomon-test-notify-{}-{}", std::process::id(), free_port());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        Manager {
            sock: UnixDatagram::bind_addr(&addr).unwrap(),
            env: format!("@{name}"),
        }
    }

    /// The next notification within `limit`.
    fn next(&self, limit: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Every notification for `span`, with when it came.
    fn collect(&self, span: Duration) -> Vec<(Instant, String)> {
        let end = Instant::now() + span;
        let mut v = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.next(left.max(Duration::from_millis(1))) {
                Some(m) => v.push((Instant::now(), m)),
                None => break,
            }
        }
        v
    }
}

/// `gnomon serve` with `extra` config (after `listen`) under `manager`, watchdog every `watchdog_usec` if given.
fn start_notified(manager: &Manager, extra: &str, watchdog_usec: Option<u64>) -> Gnomon {
    let dir = tempdir("notify-srv");
    let control = dir.join("control.sock");
    let path = dir.join("gnomon.toml");
    std::fs::write(
        &path,
        format!(
            "control_socket = \"{}\"\nlisten = [\"127.0.0.1:0\"]\n{extra}",
            control.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(GNOMON);
    cmd.arg("serve")
        .arg("--config")
        .arg(&path)
        .env("NOTIFY_SOCKET", &manager.env);
    match watchdog_usec {
        Some(u) => cmd.env("WATCHDOG_USEC", u.to_string()),
        None => cmd.env_remove("WATCHDOG_USEC"),
    };
    cmd.env_remove("WATCHDOG_PID");
    Gnomon::launch(cmd, dir, control)
}

/// Waits for READY=1 (within 5 s) and returns its datagram.
fn ready(m: &Manager) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match m.next(left) {
            Some(msg) if msg.lines().any(|l| l == "READY=1") => return msg,
            Some(_) => {}
            None => break,
        }
    }
    panic!("no READY=1 within 5 s");
}

fn pings(msgs: &[(Instant, String)]) -> Vec<Instant> {
    msgs.iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect()
}

#[test]
fn ready_status_and_watchdog_pings_reach_a_path_socket() {
    let dir = tempdir("notify");
    let m = Manager::at_path(&dir);
    let mut srv = start_notified(&m, "local_stratum = 5\nworkers = 2\n", Some(400_000));
    let msg = ready(&m);
    // Every worker reads its socket by now: the first request is answered at once.
    let s = client(srv.addr());
    assert!(
        exchange(&s, srv.addr(), &request(4, 3, 42)).is_some(),
        "READY=1 came before the server answered"
    );
    let status = msg
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .expect("STATUS= with READY=1");
    assert_eq!(status, "serving stratum 5, synchronised to 76.79.67.76 (LOCL)");
    // WATCHDOG_USEC 0.4 s: a ping every 0.2 s, so about 7 in 1.5 s.
    let n = pings(&m.collect(Duration::from_millis(1500))).len();
    assert!((3..=20).contains(&n), "{n} pings in 1.5 s");
    srv.stop();
    let rest = m.collect(Duration::from_millis(500));
    assert!(rest.iter().any(|(_, m)| m == "STOPPING=1"), "{rest:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_abstract_socket_gets_ready_and_no_pings_without_watchdog_usec() {
    let m = Manager::abstract_name();
    let _srv = start_notified(&m, "local_stratum = 5\n", None);
    let msg = ready(&m);
    assert!(msg.contains("STATUS=serving stratum 5"), "{msg}");
    let rest = m.collect(Duration::from_millis(800));
    assert!(pings(&rest).is_empty(), "pings without WATCHDOG_USEC: {rest:?}");
}

#[test]
fn the_status_says_unsynchronised_and_why() {
    let dir = tempdir("notify-unsync");
    let m = Manager::at_path(&dir);
    // An upstream that never answers.
    let extra = format!("[[upstream]]\naddress = \"127.0.0.1\"\nport = {}\n", free_port());
    let mut srv = start_notified(&m, &extra, None);
    let msg = ready(&m);
    assert!(msg.contains("STATUS=serving unsynchronised (LI 3): "), "{msg}");
    srv.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Stops one thread of another process (and only that thread) with ptrace, until dropped.
struct Frozen(libc::pid_t);

impl Frozen {
    fn freeze(tid: libc::pid_t) -> Option<Frozen> {
        // SAFETY: PTRACE_SEIZE and PTRACE_INTERRUPT take a tid and no memory.
        let seized = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) } == 0;
        if !seized {
            eprintln!("SKIPPED: ptrace refused: {}", std::io::Error::last_os_error());
            return None;
        }
        // SAFETY: as above.
        assert_eq!(unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) }, 0);
        let mut status = 0;
        // SAFETY: `status` is writable; waits for the tracee's stop.
        let r = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        assert_eq!(r, tid, "waitpid: {}", std::io::Error::last_os_error());
        Some(Frozen(tid))
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: the tracee is in a ptrace stop; detaching resumes it.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}

#[test]
fn a_hung_worker_stops_the_watchdog_pings_until_it_runs_again() {
    let dir = tempdir("notify-hang");
    let m = Manager::at_path(&dir);
    let srv = start_notified(&m, "local_stratum = 5\nworkers = 2\nio = \"mmsg\"\n", Some(400_000));
    ready(&m);
    let pid = srv.child.id();
    let tid = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "gnomon-worker-1"))
        .map(|t| t.file_name().to_string_lossy().parse::<libc::pid_t>().unwrap())
        .expect("worker 1's thread");
    assert!(
        !pings(&m.collect(Duration::from_millis(600))).is_empty(),
        "pings before the hang"
    );
    // The test thread that froze the worker must also be the one that lets it go, so all of
    // this stays on this thread.
    let Some(frozen) = Frozen::freeze(tid) else { return };
    let frozen_at = Instant::now();
    // STALL is 2 s: pings go on until then, and then stop (1.5 s of slack for a late tick on a
    // loaded machine; without the check they go on to the end of the 5 s).
    let during = m.collect(Duration::from_millis(5000));
    let last = pings(&during).last().copied();
    let quiet_from = frozen_at + gnomon::notify::STALL + Duration::from_millis(1500);
    assert!(
        last.is_none_or(|t| t < quiet_from),
        "a ping {:?} after the worker froze",
        last.map(|t| t - frozen_at)
    );
    drop(frozen);
    let after = m.collect(Duration::from_millis(1500));
    assert!(!pings(&after).is_empty(), "no pings after the worker runs again");
    let mut logged = false;
    while let Ok(l) = srv.log.try_recv() {
        logged |= l.contains("worker 1 has not published its counters");
    }
    assert!(logged, "the hang was not logged");
    let _ = std::fs::remove_dir_all(&dir);
}

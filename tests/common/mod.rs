//! Shared helpers for the loopback integration tests: start `gnomon serve` on a free port, find
//! real client programs, run them with bounded time, and clean up.
#![allow(dead_code)]

pub mod alloc;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const GNOMON: &str = env!("CARGO_BIN_EXE_gnomon");

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh temp directory for one test.
pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "gnomon-test-{}-{}-{}",
        tag,
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Whether an external program is installed. In CI (`CI` set) a missing tool fails the test,
/// because `.ci/run` installs it; elsewhere the test is skipped with a message.
pub fn have_tool(path: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{path} is missing, but .ci/run installs it");
    }
    skip(&format!(
        "{path} is not installed (README, \"Set-up\": .ci/run installs it)"
    ));
    false
}

/// Prints `SKIPPED: why` where a plain `cargo test` shows it (see [`say`]).
pub fn skip(why: &str) {
    say(&format!("SKIPPED: {why}"));
}

/// Prints a line that a plain `cargo test` shows: libtest captures `eprintln!` of a passing
/// test (it shows only with `--nocapture`), but not writes to the stderr handle itself.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A running `gnomon serve`, stopped with SIGTERM when dropped.
pub struct Gnomon {
    pub child: Child,
    pub addrs: Vec<SocketAddr>,
    pub control: PathBuf,
    pub dir: PathBuf,
    pub log: mpsc::Receiver<String>,
    /// What it logged until it served (`log` has the lines after).
    pub startup_log: Vec<String>,
}

impl Gnomon {
    /// Starts the server with `extra` config lines; `listen` defaults to 127.0.0.1 on a free port.
    pub fn start(extra: &str) -> Gnomon {
        Self::start_with_args(extra, &[])
    }

    pub fn start_with_args(extra: &str, args: &[&str]) -> Gnomon {
        Self::start_via(&[], extra, args)
    }

    /// As [`Gnomon::start_with_args`], through `wrapper`: a program and its arguments that end
    /// by exec'ing the rest of the command line (so the child's PID is gnomon's), e.g.
    /// `unshare -m sh -c '...; exec "$0" "$@"'`.
    pub fn start_via(wrapper: &[&str], extra: &str, args: &[&str]) -> Gnomon {
        let dir = tempdir("srv");
        let control = dir.join("control.sock");
        let mut cfg = format!("control_socket = \"{}\"\n", control.display());
        if !extra.contains("listen") {
            cfg.push_str("listen = [\"127.0.0.1:0\"]\n");
        }
        cfg.push_str(extra);
        let path = dir.join("gnomon.toml");
        std::fs::write(&path, cfg).unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(GNOMON);
                c
            }
            None => Command::new(GNOMON),
        };
        cmd.arg("serve").arg("--config").arg(&path).args(args);
        Self::launch(cmd, dir, control)
    }

    /// Runs `cmd` (a `gnomon serve` the caller set up, e.g. with its own environment) and waits
    /// until it serves; `dir` is removed when the server is dropped.
    pub fn launch(mut cmd: Command, dir: PathBuf, control: PathBuf) -> Gnomon {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gnomon");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[gnomon] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addrs = Vec::new();
        let mut startup_log = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    startup_log.push(line.clone());
                    if let Some(rest) = line.split("listening on ").nth(1) {
                        let a = rest.split_whitespace().next().unwrap();
                        addrs.push(a.parse().unwrap());
                    }
                    if line.contains("control socket") {
                        break;
                    }
                }
                Err(_) => panic!("gnomon did not start within 10 s"),
            }
        }
        Gnomon {
            child,
            addrs,
            control,
            dir,
            log: rx,
            startup_log,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Runs `gnomon ARGS --control <this server's control socket>`.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(GNOMON)
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .unwrap()
    }

    /// `gnomon stats --json` parsed.
    pub fn stats(&self) -> serde_json::Value {
        let out = self.ctl(&["stats", "--json"]);
        assert!(
            out.status.success(),
            "stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("stats json")
    }

    /// A total counter, after waiting for the workers to publish (they do every 200 ms).
    pub fn counter(&self, name: &str) -> u64 {
        self.stats()["total"]["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Polls `counter` until it reaches `want` or 3 s pass; returns the last value.
    pub fn wait_counter(&self, name: &str, want: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let v = self.counter(name);
            if v >= want || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("gnomon did not stop within 5 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Gnomon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .status();
            std::thread::sleep(Duration::from_millis(50));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client socket on loopback with a short timeout.
pub fn client(server: SocketAddr) -> UdpSocket {
    let bind = if server.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" };
    let s = UdpSocket::bind(bind).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    s
}

/// Sends one datagram and returns the reply, if any arrives within the timeout.
pub fn exchange(sock: &UdpSocket, server: SocketAddr, req: &[u8]) -> Option<Vec<u8>> {
    sock.send_to(req, server).unwrap();
    let mut buf = [0u8; 2048];
    match sock.recv_from(&mut buf) {
        Ok((n, _)) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

/// A v4 client request with the given transmit timestamp bits.
pub fn request(version: u8, mode: u8, transmit: u64) -> Vec<u8> {
    let mut b = vec![0u8; 48];
    b[0] = (version << 3) | mode;
    b[40..48].copy_from_slice(&transmit.to_be_bytes());
    b
}

/// Datagrams a server must never answer, each with the counter that drops it (tests/serve.rs
/// on the kernel path, tests/xdp.rs on the AF_XDP path).
pub fn bad_input_corpus() -> Vec<(Vec<u8>, &'static str)> {
    let mut corpus: Vec<(Vec<u8>, &'static str)> = vec![
        (vec![], "drop_too_short"),
        (vec![0x23], "drop_too_short"),
        (vec![0x23; 47], "drop_too_short"),
        (request(4, 3, 1)[..40].to_vec(), "drop_too_short"),
        (
            {
                let mut v = request(4, 3, 1);
                v.resize(1025, 0);
                v
            },
            "drop_oversized",
        ),
        (
            {
                let mut v = request(4, 3, 1);
                v.resize(1400, 0xaa);
                v
            },
            "drop_oversized",
        ),
    ];
    for mode in [1u8, 2, 4, 5] {
        corpus.push((request(4, mode, 1), "drop_bad_mode"));
    }
    corpus.push((request(4, 0, 1), "drop_bad_mode"));
    for mode in [6u8, 7] {
        corpus.push((request(2, mode, 1), "drop_control_mode"));
        corpus.push((request(4, mode, 1), "drop_control_mode"));
    }
    // The classic monlist request (mode 7, implementation 3, request 42): control mode
    // whatever its length.
    corpus.push((vec![0x17, 0x00, 0x03, 0x2a, 0, 0, 0, 0], "drop_control_mode"));
    let mut monlist = vec![0x17, 0x00, 0x03, 0x2a];
    monlist.resize(48, 0);
    corpus.push((monlist, "drop_control_mode"));
    for v in [0u8, 5, 6, 7] {
        corpus.push((request(v, 3, 1), "drop_bad_version"));
    }
    corpus
}

/// Runs a command with a hard time limit; returns (status success, stdout+stderr). The command
/// runs in its own process group, which is killed whole at the limit (a script's children too).
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> (bool, String) {
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let mut s = String::from_utf8_lossy(&out.stdout).to_string();
            s.push_str(&String::from_utf8_lossy(&out.stderr));
            return (st.success(), s);
        }
        if Instant::now() > deadline {
            // SAFETY: kill has no memory preconditions; the group is the child's own (above).
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            let mut s = String::from_utf8_lossy(&out.stdout).to_string();
            s.push_str(&String::from_utf8_lossy(&out.stderr));
            s.push_str("\n<killed: time limit>");
            return (false, s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub const CHRONYD: &str = "/usr/sbin/chronyd";

/// A child chronyd, killed when dropped.
pub struct Chronyd {
    pub child: Child,
    pub port: u16,
}

impl Drop for Chronyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

static LOOPBACK_SEQ: AtomicU32 = AtomicU32::new(0);

/// A loopback address of this test's own, for a test that needs a fixed port (ntpdig only talks
/// to 123): gnomon refuses to share an address and port, so test runs at the same time on this
/// machine must not pick the same one. Made of the pid and a count (up to 4 per process).
pub fn own_loopback() -> std::net::Ipv4Addr {
    let v = ((LOOPBACK_SEQ.fetch_add(1, Ordering::Relaxed) & 3) << 22) | (std::process::id() & 0x3f_ffff);
    std::net::Ipv4Addr::new(127, (v >> 16) as u8, (v >> 8) as u8, v as u8)
}

/// A loopback UDP port nobody uses right now (a small race with other tests is acceptable).
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// chronyd arguments that never touch the system clock (`-x`).
pub fn chronyd_args(conf: &Path) -> Vec<String> {
    let mut a = vec!["-x".to_string(), "-f".to_string(), conf.display().to_string()];
    if is_root() {
        // Stay root: the compiled-in user may not own the temp files.
        a.extend(["-u".to_string(), "root".to_string()]);
    }
    a
}

/// A Debian chronyd serving its own clock as stratum 1 on a loopback port.
pub fn start_chronyd(dir: &Path, i: usize) -> Chronyd {
    start_chronyd_on(dir, i, free_port())
}

/// [`start_chronyd`] on a given port (to restart one where its clients expect it).
pub fn start_chronyd_on(dir: &Path, i: usize, port: u16) -> Chronyd {
    let conf = dir.join(format!("server{i}.conf"));
    std::fs::write(
        &conf,
        format!(
            "local stratum 1\nallow 127.0.0.1\nport {port}\nbindaddress 127.0.0.1\ncmdport 0\nbindcmdaddress /\npidfile {}\n",
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
pub fn udp_server(
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answer: impl Fn(&[u8]) -> Option<[u8; 48]> + Send + 'static,
) -> (u16, std::thread::JoinHandle<()>) {
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

/// A wrong upstream: stratum 1, but `offset_s` ahead of the kernel clock.
pub fn fake_server(
    offset_s: i64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (u16, std::thread::JoinHandle<()>) {
    udp_server(stop, fake_answer(offset_s))
}

/// What [`fake_server`] answers: stratum 1, `offset_s` ahead of the kernel clock.
pub fn fake_answer(offset_s: i64) -> impl Fn(&[u8]) -> Option<[u8; 48]> + Send + 'static {
    use gnomon::clock::realtime_ns;
    fake_answer_with(move || {
        (
            realtime_ns() + offset_s * 1_000_000_000,
            gnomon::proto::LeapIndicator::NoWarning,
        )
    })
}

/// A stratum-1 answer from a clock of the test's own: `clock` gives its time (Unix ns) and
/// leap indicator at each call (a clock near a leap second, say).
pub fn fake_answer_with(
    clock: impl Fn() -> (i64, gnomon::proto::LeapIndicator) + Send + 'static,
) -> impl Fn(&[u8]) -> Option<[u8; 48]> + Send + 'static {
    use gnomon::proto::{NtpShort, NtpTimestamp, RefId, ServerInfo, respond};
    move |req| {
        let (now, leap) = clock();
        let ts = || NtpTimestamp::from_unix_nanos(clock().0.into());
        let info = ServerInfo {
            leap,
            stratum: 1,
            precision: -20,
            root_delay: NtpShort::ZERO,
            root_dispersion: NtpShort::from_seconds_ceil(1e-4),
            reference_id: RefId(*b"FAKE"),
            reference_timestamp: NtpTimestamp::from_unix_nanos(now.into()),
        };
        respond(req, &info, ts(), ts()).ok()
    }
}

/// Runs `chronyd -Q -x` as a client of `server`; returns its output.
pub fn chrony_client(server: std::net::SocketAddr, dir: &std::path::Path, timeout_s: u32) -> String {
    let conf = dir.join("client.conf");
    std::fs::write(
        &conf,
        format!(
            "server {} port {} iburst\npidfile {}/client.pid\ncmdport 0\nbindcmdaddress /\n",
            server.ip(),
            server.port(),
            dir.display()
        ),
    )
    .unwrap();
    let (_, out) = run_bounded(
        Command::new(CHRONYD)
            .args(["-Q", "-x", "-u", "root", "-L", "0", "-t", &timeout_s.to_string(), "-f"])
            .arg(&conf),
        Duration::from_secs(timeout_s as u64 + 10),
    );
    out
}

/// Runs `chronyd -x` (never touching the clock) for a few seconds with a measurements log, and
/// returns the log's data lines: they show the stratum and the test results chrony applied.
pub fn chrony_measurements(server: std::net::SocketAddr, dir: &std::path::Path) -> Vec<String> {
    let conf = dir.join("meas.conf");
    let logdir = dir.join("log");
    std::fs::create_dir_all(&logdir).unwrap();
    std::fs::write(
        &conf,
        format!(
            "server {} port {} iburst minpoll 0 maxpoll 0\npidfile {}/meas.pid\ncmdport 0\nbindcmdaddress /\nport 0\nlogdir {}\nlog measurements\n",
            server.ip(),
            server.port(),
            dir.display(),
            logdir.display()
        ),
    )
    .unwrap();
    let _ = run_bounded(
        Command::new(CHRONYD)
            .args(["-x", "-d", "-u", "root", "-L", "0", "-f"])
            .arg(&conf),
        Duration::from_secs(4),
    );
    std::fs::read_to_string(logdir.join("measurements.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("20"))
        .map(str::to_string)
        .collect()
}

/// The offset `chronyd -Q` reports ("System clock wrong by X seconds"), if it got one.
pub fn chrony_offset(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.contains("System clock wrong by"))?;
    line.split("wrong by ").nth(1)?.split_whitespace().next()?.parse().ok()
}

/// A client socket bound to `src` (any 127.x.y.z works on Linux loopback).
pub fn from(src: &str) -> UdpSocket {
    let s = UdpSocket::bind(format!("{src}:0")).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    s
}

/// Sends `n` requests at `rate` per second from `src`; returns (normal replies, KoD codes seen).
pub fn send_paced(src: &str, target: SocketAddr, n: u32, rate: f64) -> (u32, Vec<gnomon::proto::RefId>) {
    let s = from(src);
    s.set_nonblocking(true).unwrap();
    let start = Instant::now();
    let mut ok = 0;
    let mut kods = Vec::new();
    let mut buf = [0u8; 100];
    let mut drain = |ok: &mut u32, kods: &mut Vec<gnomon::proto::RefId>| {
        while let Ok(n) = s.recv(&mut buf) {
            let h = gnomon::proto::Header::decode(&buf[..n]).unwrap();
            match h.kiss_code() {
                Some(k) => kods.push(k),
                None => *ok += 1,
            }
        }
    };
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        while Instant::now() < due {
            drain(&mut ok, &mut kods);
            std::thread::sleep(Duration::from_micros(500));
        }
        s.send_to(&request(4, 3, i as u64 + 1), target).unwrap();
    }
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        drain(&mut ok, &mut kods);
        std::thread::sleep(Duration::from_millis(5));
    }
    (ok, kods)
}

/// Backends this kernel allows, as (config `io` value, name in `gnomon stats`); io_uring is
/// skipped (not failed) where it is refused.
pub fn backends() -> Vec<(&'static str, &'static str)> {
    let mut v = vec![("mmsg", "mmsg")];
    match gnomon::server::uring::probe() {
        Ok(()) => v.extend([("uring", "io_uring"), ("uring-send", "io_uring-send")]),
        Err(e) => skip(&format!("io_uring backend: {}", e.0)),
    }
    v
}

/// Makes syscall `nr` (only where its first argument is `arg0`, if given) fail with `errno` in
/// the child `cmd` starts, through a seccomp filter as container runtimes install them. False,
/// with a SKIPPED line, on an architecture this does not know.
pub fn deny_syscall(cmd: &mut Command, nr: libc::c_long, arg0: Option<u32>, errno: i32) -> bool {
    use std::os::unix::process::CommandExt;
    let arch: u32 = if cfg!(all(target_arch = "x86_64", target_endian = "little")) {
        0xC000_003E // AUDIT_ARCH_X86_64
    } else if cfg!(all(target_arch = "aarch64", target_endian = "little")) {
        0xC000_00B7 // AUDIT_ARCH_AARCH64
    } else {
        skip("no seccomp filter for this architecture");
        return false;
    };
    let stmt = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt: 0,
        jf,
        k,
    };
    let ld = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    // struct seccomp_data: nr at 0, arch at 4, args[0] at 16 (low half first on little-endian).
    // Each failed comparison jumps to the final ALLOW.
    let checks: Vec<(u32, u32)> = [(4, arch), (0, nr as u32)]
        .into_iter()
        .chain(arg0.map(|a| (16, a)))
        .collect();
    let mut prog = Vec::new();
    for (i, (offset, value)) in checks.iter().enumerate() {
        let left = checks.len() - 1 - i;
        prog.push(stmt(ld, *offset));
        prog.push(jeq(*value, (2 * left + 1) as u8));
    }
    prog.push(stmt(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_ERRNO | errno as u32,
    ));
    prog.push(stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_ALLOW));
    let prog: &'static [libc::sock_filter] = prog.leak();
    // SAFETY: the closure runs in the forked child before exec and only makes two prctl calls
    // (async-signal-safe) on a filter that lives for the rest of the program.
    unsafe {
        cmd.pre_exec(move || {
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &fprog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    true
}

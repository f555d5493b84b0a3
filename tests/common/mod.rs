//! Shared helpers for the loopback integration tests: start `gnomon serve` on a free port, find
//! real client programs, run them with bounded time, and clean up.
#![allow(dead_code)]

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
    eprintln!("SKIPPED: {path} is not installed (apt-get install chrony ntpsec-ntpdig)");
    false
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
}

impl Gnomon {
    /// Starts the server with `extra` config lines; `listen` defaults to 127.0.0.1 on a free port.
    pub fn start(extra: &str) -> Gnomon {
        Self::start_with_args(extra, &[])
    }

    pub fn start_with_args(extra: &str, args: &[&str]) -> Gnomon {
        let dir = tempdir("srv");
        let control = dir.join("control.sock");
        let mut cfg = format!("control_socket = \"{}\"\n", control.display());
        if !extra.contains("listen") {
            cfg.push_str("listen = [\"127.0.0.1:0\"]\n");
        }
        cfg.push_str(extra);
        let path = dir.join("gnomon.toml");
        std::fs::write(&path, cfg).unwrap();
        let mut child = Command::new(GNOMON)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .args(args)
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
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
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
    use gnomon::clock::realtime_ns;
    use gnomon::proto::{LeapIndicator, NtpShort, NtpTimestamp, RefId, ServerInfo, respond};
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

/// Runs `chronyd -Q -x` as a client of `server`; returns its output.
pub fn chrony_client(server: std::net::SocketAddr, dir: &std::path::Path, timeout_s: u32) -> String {
    let conf = dir.join("client.conf");
    std::fs::write(
        &conf,
        format!(
            "server {} port {} iburst\npidfile {}/client.pid\ncmdport 0\n",
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
            "server {} port {} iburst minpoll 0 maxpoll 0\npidfile {}/meas.pid\ncmdport 0\nport 0\nlogdir {}\nlog measurements\n",
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

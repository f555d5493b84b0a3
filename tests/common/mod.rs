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

    /// `gnomon stats --json` parsed.
    pub fn stats(&self) -> serde_json::Value {
        let out = Command::new(GNOMON)
            .arg("stats")
            .arg("--json")
            .arg("--control")
            .arg(&self.control)
            .output()
            .unwrap();
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

/// Runs a command with a hard time limit; returns (status success, stdout+stderr).
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> (bool, String) {
    let mut child = cmd
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

//! The process as an operator meets it: a second server on our port (gnomon or chronyd) or our
//! control socket makes `gnomon serve` refuse to start, a failing worker ends the process
//! non-zero, the control path and control server resist mistakes and slow clients, a host
//! without IPv6 still serves the default wildcard pair on IPv4, and the systemd unit restarts.

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A config for a server that is expected not to start, with its own control socket in `dir`.
fn config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("gnomon.toml");
    let mut cfg = String::new();
    if !body.contains("control_socket") {
        cfg.push_str(&format!(
            "control_socket = \"{}\"\n",
            dir.join("control.sock").display()
        ));
    }
    cfg.push_str(body);
    std::fs::write(&path, cfg).unwrap();
    path
}

/// Runs `gnomon serve --config PATH` that must refuse to start; returns its output. Fails if it
/// was still running after 10 s, which is what sharing the port looks like.
fn refused(path: &Path) -> String {
    let (ok, out) = run_bounded(
        Command::new(GNOMON).arg("serve").arg("--config").arg(path),
        Duration::from_secs(10),
    );
    assert!(!out.contains("<killed: time limit>"), "gnomon started and ran:\n{out}");
    assert!(!ok, "gnomon exited 0:\n{out}");
    out
}

/// Whether any server still answers a v4 request at `addr`.
fn answers(addr: std::net::SocketAddr) -> bool {
    let s = client(addr);
    (0..5).any(|i| exchange(&s, addr, &request(4, 3, 1000 + i)).is_some())
}

#[test]
fn second_instance_on_the_same_port_refuses_and_names_the_first() {
    let port = free_port();
    let first = Gnomon::start(&format!("listen = [\"127.0.0.1:{port}\"]\nlocal_stratum = 5\n"));
    let dir = tempdir("second");
    // Its own control socket, so only the check of the kernel's UDP table can stop it.
    let out = refused(&config(&dir, &format!("listen = [\"127.0.0.1:{port}\"]\n")));
    assert!(
        !dir.join("control.sock").exists(),
        "the refused server left its control socket"
    );
    assert!(
        out.contains(&format!("127.0.0.1:{port} is already served by gnomon")),
        "{out}"
    );
    assert!(out.contains(&format!("pid {}", first.child.id())), "{out}");
    // A wildcard over the first one's specific address is the same conflict.
    let out = refused(&config(&dir, &format!("listen = [\"0.0.0.0:{port}\"]\n")));
    assert!(out.contains(&format!("pid {}", first.child.id())), "{out}");
    assert!(answers(first.addr()), "the first server stopped answering");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_restart_right_after_sigkill_is_not_refused() {
    // The kernel closes an io_uring's sockets after the process is gone, so for a moment the old
    // server's sockets are still in the UDP table: a restart must wait for them, not refuse.
    // Before the wait, 4 of 10 restarts here were refused as "already served".
    let port = free_port();
    let body = format!("listen = [\"127.0.0.1:{port}\"]\nworkers = 2\nlocal_stratum = 5\n");
    for _ in 0..10 {
        let mut srv = Gnomon::start(&body);
        assert!(answers(srv.addr()));
        srv.child.kill().unwrap();
        srv.child.wait().unwrap();
    }
}

#[test]
fn second_instance_with_the_same_control_socket_refuses() {
    let first = Gnomon::start("");
    let dir = tempdir("samectl");
    let out = refused(&config(
        &dir,
        &format!(
            "control_socket = \"{}\"\nlisten = [\"127.0.0.1:0\"]\n",
            first.control.display()
        ),
    ));
    assert!(
        out.contains(&format!("locked by gnomon pid {}", first.child.id())),
        "{out}"
    );
    // The first one's control socket is untouched.
    assert!(first.stats()["total"]["counters"].is_object());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gnomon_beside_chronyd_on_the_same_port_refuses_and_names_chronyd() {
    if !have_tool(CHRONYD) {
        return;
    }
    if !is_root() {
        skip("chronyd with its own pidfile and port needs root here");
        return;
    }
    let dir = tempdir("besidechrony");
    let chronyd = start_chronyd(&dir, 0);
    let theirs: std::net::SocketAddr = format!("127.0.0.1:{}", chronyd.port).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gnomon::server::listeners::read_udp_table()
        .unwrap()
        .iter()
        .any(|e| e.local == theirs)
    {
        assert!(Instant::now() < deadline, "chronyd did not bind {theirs} within 5 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = refused(&config(&dir, &format!("listen = [\"{theirs}\"]\n")));
    assert!(
        out.contains(&format!(
            "{theirs} is already served by chronyd (pid {}",
            chronyd.child.id()
        )),
        "{out}"
    );
    assert!(answers(theirs), "chronyd stopped answering");
    drop(chronyd);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn address_taken_without_reuseport_names_the_holder() {
    // std binds without SO_REUSEPORT, so the kernel itself refuses gnomon's bind (EADDRINUSE),
    // as it does for a reuseport group of another user.
    let holder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let taken = holder.local_addr().unwrap();
    let dir = tempdir("taken");
    let out = refused(&config(&dir, &format!("listen = [\"{taken}\"]\n")));
    assert!(out.contains(&format!("bind {taken}")), "{out}");
    assert!(out.contains(&format!("pid {}", std::process::id())), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reuseport_group_of_another_user_is_refused_by_the_kernel_and_named() {
    if !is_root() {
        skip("starting a server as another user needs root");
        return;
    }
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // The bare echo server binds with SO_REUSEPORT, as user nobody.
    let mut other = Command::new(GNOMON)
        .args(["bench-echo", "--listen", &addr.to_string()])
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gnomon::server::listeners::read_udp_table()
        .unwrap()
        .iter()
        .any(|e| e.local == addr && e.uid == 65534)
    {
        if Instant::now() > deadline {
            let _ = other.kill();
            let _ = other.wait();
            panic!("the echo server as nobody did not bind {addr} within 5 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let dir = tempdir("otheruid");
    let (ok, out) = run_bounded(
        Command::new(GNOMON)
            .arg("serve")
            .arg("--config")
            .arg(config(&dir, &format!("listen = [\"{addr}\"]\n"))),
        Duration::from_secs(10),
    );
    let _ = other.kill();
    let _ = other.wait();
    assert!(!ok && !out.contains("<killed"), "{out}");
    assert!(out.contains(&format!("bind {addr}: Address already in use")), "{out}");
    assert!(out.contains(&format!("gnomon (pid {}", other.id())), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_worker_error_ends_the_process_non_zero() {
    if !cfg!(debug_assertions) {
        skip("GNOMON_FAULT is honoured by debug builds only");
        return;
    }
    let dir = tempdir("fault");
    let control = dir.join("control.sock");
    let path = config(
        &dir,
        "listen = [\"127.0.0.1:0\"]\nworkers = 2\nio = \"mmsg\"\nlocal_stratum = 5\n",
    );
    let mut cmd = Command::new(GNOMON);
    cmd.arg("serve")
        .arg("--config")
        .arg(&path)
        .env("GNOMON_FAULT", "worker-error");
    let mut srv = Gnomon::launch(cmd, dir, control);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = srv.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "gnomon kept running for 10 s with a dead worker"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success(), "exit status {status}");
    let mut log = String::new();
    while let Ok(line) = srv.log.recv_timeout(Duration::from_secs(2)) {
        log.push_str(&line);
        log.push('\n');
    }
    assert!(log.contains("worker 0 failed: fault injected"), "{log}");
    assert!(log.contains("stopping the whole server"), "{log}");
}

#[test]
fn a_non_socket_at_the_control_path_survives_and_start_fails() {
    let dir = tempdir("ctlpath");
    let control = dir.join("control.sock");
    let listen = "listen = [\"127.0.0.1:0\"]\n";
    std::fs::write(&control, "operator's notes\n").unwrap();
    let out = refused(&config(&dir, listen));
    assert!(out.contains("is a regular file, not a socket"), "{out}");
    assert_eq!(std::fs::read_to_string(&control).unwrap(), "operator's notes\n");

    std::fs::remove_file(&control).unwrap();
    let target = dir.join("elsewhere");
    std::fs::write(&target, "x").unwrap();
    std::os::unix::fs::symlink(&target, &control).unwrap();
    let out = refused(&config(&dir, listen));
    assert!(out.contains("is a symbolic link"), "{out}");
    assert!(std::fs::symlink_metadata(&control).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "x");

    std::fs::remove_file(&control).unwrap();
    std::fs::create_dir(&control).unwrap();
    let out = refused(&config(&dir, listen));
    assert!(out.contains("is a directory"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stale_control_socket_is_replaced() {
    let mut first = Gnomon::start("");
    // SIGKILL leaves the socket file (and the lock file, unlocked) behind.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    assert!(first.control.exists());
    let cfg = first.dir.join("gnomon.toml");
    let control = first.control.clone();
    let mut cmd = Command::new(GNOMON);
    cmd.arg("serve").arg("--config").arg(&cfg);
    let dir = tempdir("stale");
    let second = Gnomon::launch(cmd, dir, control);
    assert!(second.stats()["total"]["counters"].is_object());
}

#[test]
fn a_silent_control_client_does_not_block_others() {
    let srv = Gnomon::start("");
    // The old server handled clients one by one, waiting 2 s for each one's line: four silent
    // clients held `gnomon stats` for 8 s.
    let silent: Vec<UnixStream> = (0..4).map(|_| UnixStream::connect(&srv.control).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let out = srv.ctl(&["stats"]);
    let took = t.elapsed();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        took < Duration::from_secs(3),
        "stats took {took:?} behind silent clients"
    );
    drop(silent);
}

#[test]
fn control_clients_beyond_the_cap_are_told_so_at_once() {
    let srv = Gnomon::start("");
    let cap = gnomon::control::MAX_CLIENTS;
    let silent: Vec<UnixStream> = (0..cap).map(|_| UnixStream::connect(&srv.control).unwrap()).collect();
    let mut extra = UnixStream::connect(&srv.control).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reply = String::new();
    let _ = extra.read_to_string(&mut reply);
    assert!(reply.starts_with("error: too many control clients"), "reply {reply:?}");
    drop(silent);
    // The slots free up as the silent clients go.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !srv.ctl(&["stats"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "stats still refused 5 s after the silent clients left"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_request_line_of_exactly_the_cap_is_answered() {
    let srv = Gnomon::start("");
    let cap = gnomon::control::MAX_REQUEST_LINE;
    let mut line = "stats".to_string();
    line.push_str(&" ".repeat(cap - line.len()));
    let mut s = UnixStream::connect(&srv.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(!reply.starts_with("error"), "reply {reply:?}");
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn an_overlong_control_line_gets_an_error_without_memory_growth() {
    let srv = Gnomon::start("");
    let before = vm_hwm_kib(srv.child.id());
    let mut s = UnixStream::connect(&srv.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    // 64 MiB without a newline: the old server read it all into one String.
    let chunk = vec![b'a'; 64 << 10];
    for _ in 0..1024 {
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    // The server closes with our bytes unread, so the reply may end in ECONNRESET.
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
    }
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("error: request line longer than 4096 bytes"),
        "reply {reply:?}"
    );
    let grown = vm_hwm_kib(srv.child.id()).saturating_sub(before);
    assert!(grown < 16 << 10, "peak memory grew by {grown} KiB");
    // Still serving.
    assert!(srv.stats()["total"]["counters"].is_object());
}

/// Makes `socket(AF_INET6, ...)` fail with EAFNOSUPPORT in the child, as on a kernel booted with
/// `ipv6.disable=1`. (A network namespace with `disable_ipv6=1` does not reproduce it: there
/// `bind([::])` still succeeds, only specific IPv6 addresses fail.) False, with a SKIPPED line,
/// where the filter cannot be installed.
fn without_ipv6(cmd: &mut Command) -> bool {
    let mut probe = Command::new("/bin/true");
    add_ipv6_filter(&mut probe)
        && {
            let ok = probe.status().is_ok_and(|s| s.success());
            if !ok {
                skip("cannot install a seccomp filter here");
            }
            ok
        }
        && add_ipv6_filter(cmd)
}

fn add_ipv6_filter(cmd: &mut Command) -> bool {
    deny_syscall(cmd, libc::SYS_socket, Some(libc::AF_INET6 as u32), libc::EAFNOSUPPORT)
}

#[test]
fn default_listen_serves_ipv4_when_the_kernel_has_no_ipv6() {
    // The embedded default is the wildcard pair on 123; the test uses the same pair on a free port.
    let default = gnomon::config::Config::embedded().serve.listen;
    assert_eq!(
        default,
        vec!["0.0.0.0:123".parse().unwrap(), "[::]:123".parse().unwrap()]
    );
    let port = free_port();
    let dir = tempdir("noipv6");
    let control = dir.join("control.sock");
    let path = config(
        &dir,
        &format!("listen = [\"0.0.0.0:{port}\", \"[::]:{port}\"]\nlocal_stratum = 5\n"),
    );
    let mut cmd = Command::new(GNOMON);
    cmd.arg("serve").arg("--config").arg(&path);
    if !without_ipv6(&mut cmd) {
        return;
    }
    let srv = Gnomon::launch(cmd, dir.clone(), control);
    assert_eq!(srv.addrs, vec![format!("0.0.0.0:{port}").parse().unwrap()]);
    let v4: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(answers(v4), "no IPv4 reply");
    drop(srv);
    // io_uring rings are torn down after the process is gone, and their sockets with them (a
    // few ms later): until then the port still looks served.
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline
        && gnomon::server::listeners::read_udp_table()
            .unwrap()
            .iter()
            .any(|e| e.local.port() == port)
    {
        std::thread::sleep(Duration::from_millis(5));
    }

    // An explicit IPv6 address stays an error.
    let dir = tempdir("noipv6-explicit");
    let path = config(&dir, &format!("listen = [\"127.0.0.1:{port}\", \"[::1]:{port}\"]\n"));
    let mut cmd = Command::new(GNOMON);
    cmd.arg("serve").arg("--config").arg(&path);
    assert!(without_ipv6(&mut cmd));
    let (ok, out) = run_bounded(&mut cmd, Duration::from_secs(10));
    assert!(!ok && !out.contains("<killed"), "{out}");
    assert!(out.contains(&format!("bind [::1]:{port}")), "{out}");
    assert!(out.contains("Address family not supported"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn systemd_unit_restarts_without_giving_up() {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/gnomon.service")).unwrap();
    let mut section = "";
    let mut keys = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if let Some((k, v)) = line.split_once('=') {
            keys.push((section, k.trim(), v.trim()));
        }
    }
    let get = |s: &str, k: &str| keys.iter().find(|e| e.0 == s && e.1 == k).map(|e| e.2);
    assert!(matches!(get("[Service]", "Restart"), Some("on-failure" | "always")));
    assert_eq!(get("[Service]", "RestartSec"), Some("1"));
    // In [Unit]: systemd ignores it in [Service] on current versions.
    assert_eq!(get("[Unit]", "StartLimitIntervalSec"), Some("0"));
}

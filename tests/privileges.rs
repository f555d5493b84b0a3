//! Privileges outside systemd: started as root with `user`/`group`, gnomon binds port 123, then
//! every thread runs as that user with no capability left (software mode), and it still answers
//! and can be asked over its control socket. Without the capability, a bind of port 123 says
//! which one is missing. Root only (skipped otherwise).

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

const NOBODY: u32 = 65534;

fn need_root() -> bool {
    if !is_root() {
        eprintln!("SKIPPED: needs root (to start gnomon as root and bind port 123)");
        return false;
    }
    let has =
        |file: &str, entry: &str| std::fs::read_to_string(file).is_ok_and(|t| t.lines().any(|l| l.starts_with(entry)));
    if !has("/etc/passwd", "nobody:x:65534:") || !has("/etc/group", "nogroup:x:65534:") {
        eprintln!("SKIPPED: no user `nobody` or group `nogroup` here");
        return false;
    }
    true
}

/// The fields of a /proc status file.
fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(':')))
        .unwrap_or_else(|| panic!("no {key} in\n{status}"))
        .trim()
}

/// The status of every thread of `pid`, by thread name.
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        v.push((field(&status, "Name").to_string(), status));
    }
    v
}

#[test]
fn started_as_root_it_serves_port_123_as_the_configured_user_without_capabilities() {
    if !need_root() {
        return;
    }
    let ip = own_loopback();
    let srv = Gnomon::start(&format!(
        "listen = [\"{ip}:123\"]\nlocal_stratum = 5\nworkers = 2\nuser = \"nobody\"\ngroup = \"nogroup\"\n"
    ));
    let pid = srv.child.id();
    // A new thread names itself once it runs: wait (bounded) until all have.
    let complete = |all: &[(String, String)]| {
        let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        names.iter().filter(|n| n.starts_with("gnomon-worker")).count() == 2
            && names.contains(&"gnomon-sync")
            && names.contains(&"gnomon-control")
    };
    let mut all = threads(pid);
    for _ in 0..50 {
        if complete(&all) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        all = threads(pid);
    }
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert!(complete(&all), "threads: {names:?}");
    for (name, st) in &all {
        let ids = |k| {
            field(st, k)
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect::<Vec<u32>>()
        };
        assert_eq!(ids("Uid"), vec![NOBODY; 4], "{name}: real, effective, saved, fs uid");
        assert_eq!(ids("Gid"), vec![NOBODY; 4], "{name}: real, effective, saved, fs gid");
        assert_eq!(field(st, "Groups"), "", "{name}: no supplementary groups");
        for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(field(st, cap), "0000000000000000", "{name}: {cap}");
        }
        assert_eq!(field(st, "NoNewPrivs"), "1", "{name}");
    }
    eprintln!("{} threads all run as nobody:nogroup with no capabilities", all.len());

    // Still serving on the privileged port it bound as root.
    let addr = srv.addr();
    assert_eq!(addr.port(), 123);
    let s = client(addr);
    let reply = (0..5).find_map(|i| exchange(&s, addr, &request(4, 3, 7000 + i)));
    let reply = reply.expect("no NTP reply on port 123 after the drop");
    assert_eq!(reply[1], 5, "stratum of the reply");

    // The control socket belongs to the user now, and answers root and the user alike.
    let meta = std::fs::metadata(&srv.control).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
    assert!(srv.wait_counter("answered", 1) >= 1, "stats over the control socket");
    let as_nobody = Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            GNOMON,
            "stats",
            "--control",
        ])
        .arg(&srv.control)
        .output();
    match as_nobody {
        Ok(out) => assert!(
            out.status.success(),
            "stats as nobody: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("SKIPPED (part): setpriv: {e}"),
    }
    // Reloading re-reads the config as the user.
    let out = srv.ctl(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn started_as_root_without_user_it_warns() {
    if !need_root() {
        return;
    }
    let dir = tempdir("rootwarn");
    let path = dir.join("gnomon.toml");
    std::fs::write(
        &path,
        format!(
            "listen = [\"127.0.0.1:0\"]\ncontrol_socket = \"{}\"\nlocal_stratum = 5\n",
            dir.join("control.sock").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(GNOMON)
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let mut log = Vec::new();
    // Bounded: the server prints "control socket" within a second of starting.
    while let Some(Ok(l)) = lines.next() {
        let done = l.contains("control socket");
        log.push(l);
        if done || log.len() > 50 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        log.iter()
            .any(|l| l.contains("warn: running as root") && l.contains("set `user`")),
        "{log:#?}"
    );
}

#[test]
fn a_bind_of_port_123_without_the_capability_names_it() {
    if !need_root() {
        return;
    }
    if !have_tool("/usr/bin/setpriv") {
        return;
    }
    let dir = tempdir("nocap");
    // nobody must be able to create the control socket and its lock here.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let ip = own_loopback();
    let path = dir.join("gnomon.toml");
    std::fs::write(
        &path,
        format!(
            "listen = [\"{ip}:123\"]\ncontrol_socket = \"{}\"\nlocal_stratum = 5\n",
            dir.join("control.sock").display()
        ),
    )
    .unwrap();
    let (ok, out) = run_bounded(
        Command::new("setpriv")
            .args([
                "--reuid=nobody",
                "--regid=nogroup",
                "--clear-groups",
                GNOMON,
                "serve",
                "--config",
            ])
            .arg(&path),
        Duration::from_secs(10),
    );
    assert!(!ok && !out.contains("<killed"), "{out}");
    assert!(
        out.contains(&format!("bind {ip}:123"))
            && out.contains("binding port 123 needs CAP_NET_BIND_SERVICE (or root)"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

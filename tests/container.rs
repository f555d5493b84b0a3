//! gnomon under a container runtime's default seccomp profile: Docker's and containerd's refuse
//! the io_uring syscalls (EPERM), so `io = "auto"` must serve with recvmmsg/sendmmsg and say so
//! in one log line (README, "Containers").

mod common;

use common::*;
use std::process::Command;

#[test]
fn auto_falls_back_to_mmsg_when_seccomp_refuses_io_uring() {
    let dir = tempdir("seccomp");
    let control = dir.join("control.sock");
    let path = dir.join("gnomon.toml");
    std::fs::write(
        &path,
        format!(
            "listen = [\"127.0.0.1:0\"]\nworkers = 2\nio = \"auto\"\nlocal_stratum = 10\ncontrol_socket = \"{}\"\n",
            control.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(GNOMON);
    cmd.arg("serve").arg("--config").arg(&path);
    // As the profiles do it: io_uring_setup fails with EPERM (they refuse io_uring_enter and
    // io_uring_register too, which are never reached without a ring).
    if !deny_syscall(&mut cmd, libc::SYS_io_uring_setup, None, libc::EPERM) {
        return;
    }
    let srv = Gnomon::launch(cmd, dir, control);
    let fallback: Vec<_> = srv
        .startup_log
        .iter()
        .filter(|l| l.contains("io_uring unavailable"))
        .collect();
    assert_eq!(fallback.len(), 1, "start-up log:\n{}", srv.startup_log.join("\n"));
    assert!(fallback[0].contains("Operation not permitted"), "{}", fallback[0]);
    assert!(fallback[0].contains("using recvmmsg/sendmmsg"), "{}", fallback[0]);
    assert_eq!(srv.stats()["total"]["backend"], "mmsg");
    let reply = exchange(&client(srv.addr()), srv.addr(), &request(4, 3, 1)).expect("no reply");
    assert_eq!(reply[1], 10, "stratum");
}

const DAEMONSET: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/daemonset.yaml");
const DOCKERFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/Dockerfile");

/// The DaemonSet's ConfigMap is a config gnomon accepts, its probes are command lines gnomon
/// parses, and it runs as the image's user.
#[test]
fn the_daemonset_matches_the_binary_and_the_image() {
    let yaml = std::fs::read_to_string(DAEMONSET).unwrap();
    // The ConfigMap's block scalar: the lines indented deeper than its key.
    let block: String = yaml
        .split("\n  gnomon.toml: |\n")
        .nth(1)
        .expect("no gnomon.toml in the ConfigMap")
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.get(4..).unwrap_or("")))
        .collect();
    let dir = tempdir("k8s");
    let path = dir.join("gnomon.toml");
    std::fs::write(&path, &block).unwrap();
    let (ok, out) = run_bounded(
        Command::new(GNOMON).arg("check-config").arg(&path),
        std::time::Duration::from_secs(10),
    );
    assert!(ok, "{out}\n{block}");

    let mut probes = 0;
    for line in yaml.lines().map(str::trim).filter(|l| l.starts_with("command:")) {
        let argv: Vec<String> = serde_json::from_str(line.trim_start_matches("command:").trim()).unwrap();
        assert_eq!(argv[0], "/usr/bin/gnomon", "{line}");
        // Every argument before --help must be one gnomon knows, or clap exits 2.
        let (ok, out) = run_bounded(
            Command::new(GNOMON).args(&argv[1..]).arg("--help"),
            std::time::Duration::from_secs(10),
        );
        assert!(ok, "{line}: {out}");
        probes += 1;
    }
    assert_eq!(probes, 2, "liveness and readiness");

    let dockerfile = std::fs::read_to_string(DOCKERFILE).unwrap();
    let uid = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG GNOMON_UID="))
        .expect("no ARG GNOMON_UID in the Dockerfile");
    assert!(
        yaml.contains(&format!("runAsUser: {uid} ")),
        "runAsUser is not the image's {uid}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

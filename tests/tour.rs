//! The README's five-minute tour, run verbatim: its commands are read from README.md, so the
//! README and this test cannot drift apart.
//!
//! The tour uses the real defaults (UDP 123 on the wildcard addresses, /tmp/gnomon.toml, the
//! control socket in /run/gnomon), so it runs in namespaces of its own: a network namespace
//! (a loopback nobody else uses, so port 123 is free and no packet leaves it), a mount
//! namespace with fresh /tmp and /run, and a PID namespace so that the tour's background
//! server dies with it, whatever happens.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const NTPDIG: &str = "/usr/bin/ntpdig";

/// The first ```sh block under "## A five-minute tour" in README.md.
fn tour() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("\n## A five-minute tour\n")
        .nth(1)
        .expect("README.md has no \"## A five-minute tour\" section");
    let section = section.split("\n## ").next().unwrap();
    let block = section.split("```sh\n").nth(1).expect("the tour has no ```sh block");
    block.split("\n```").next().unwrap().to_string()
}

#[test]
fn the_readme_tour_has_the_commands_this_test_expects() {
    let t = tour();
    for cmd in [
        "gnomon check-config",
        "gnomon serve",
        "gnomon query 127.0.0.1",
        "gnomon stats",
    ] {
        assert!(t.lines().any(|l| l.starts_with(cmd)), "no `{cmd}` in the tour:\n{t}");
    }
}

#[test]
fn the_readme_tour_runs_verbatim() {
    if !is_root() {
        skip("the README tour binds port 123 in namespaces of its own, which needs root");
        return;
    }
    if !have_tool("/usr/bin/unshare") || !have_tool("/usr/sbin/ip") || !have_tool(NTPDIG) {
        return;
    }
    // The tour gets a fresh /tmp and /run. The checkout may itself live under /tmp (a CI clone),
    // so the binary and the files the tour reads (deploy/) are copied into the new /run first,
    // the script goes in an environment variable, and the tour runs from that copy.
    let script = format!("{}\nkill -0 $!\n", tour());
    let (ok, out) = run_bounded(
        Command::new("unshare")
            .args(["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"])
            .args([
                "sh",
                "-c",
                "ip link set lo up && mount -t tmpfs tmpfs /run && mkdir -p /run/tour/bin /run/tour/repo \
                 && cp \"$TOUR_GNOMON\" /run/tour/bin/gnomon && cp -r \"$TOUR_REPO/deploy\" /run/tour/repo/ \
                 && mount -t tmpfs tmpfs /tmp && cd /run/tour/repo && PATH=/run/tour/bin:$PATH exec sh -ex -c \"$TOUR_SCRIPT\"",
            ])
            .current_dir("/")
            .env("TOUR_GNOMON", GNOMON)
            .env("TOUR_REPO", env!("CARGO_MANIFEST_DIR"))
            .env("TOUR_SCRIPT", script),
        Duration::from_secs(60),
    );
    assert!(ok, "the tour failed:\n{out}");
    // Each step did what the tour says it does: the config with the key, gnomon's own client
    // and ntpdig both see the LOCAL clock at stratum 10, stats in both forms.
    assert!(out.contains("/tmp/gnomon.toml: ok"), "{out}");
    let stratum = out.lines().find(|l| l.starts_with("stratum")).unwrap_or_default();
    assert_eq!(stratum.split_whitespace().nth(1), Some("10"), "{out}");
    assert!(
        out.lines().any(|l| l.contains("127.0.0.1 s10 ")),
        "no ntpdig answer:\n{out}"
    );
    assert!(out.contains("worker   cpu"), "no stats table:\n{out}");
    assert!(out.contains("\"total\""), "no JSON stats:\n{out}");
}

//! The command line as an operator meets it: the control socket found from the config file,
//! exit codes that say "unsynchronised", check-config's messages and summary, and help text for
//! every option and argument.

mod common;

use common::{GNOMON, Gnomon, tempdir};
use std::process::{Command, Output};

fn gnomon(args: &[&str]) -> Output {
    Command::new(GNOMON).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn control_commands_find_the_socket_from_the_config_file() {
    let srv = Gnomon::start("local_stratum = 10\n");
    let conf = srv.dir.join("gnomon.toml");
    let conf = conf.to_str().unwrap();
    for args in [
        &["stats", "--config", conf][..],
        &["stats", "--json", "-c", conf],
        &["sources", "--config", conf],
        &["status", "--config", conf],
        &["reload", "--config", conf],
    ] {
        let o = gnomon(args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    }
    // `--control` still overrides the config's path.
    let o = gnomon(&["stats", "--config", conf, "--control", "/nonexistent/gnomon.sock"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("/nonexistent/gnomon.sock"), "{}", text(&o));
    // A config that cannot be read says so, and how to do without it.
    let o = gnomon(&["stats", "--config", "/nonexistent/gnomon.toml"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--control"), "{}", text(&o));
}

#[test]
fn status_and_sources_exit_3_when_unsynchronised() {
    // No upstream and no local clock: every reply says LI 3.
    let srv = Gnomon::start("");
    let conf = srv.dir.join("gnomon.toml");
    let conf = conf.to_str().unwrap();
    for args in [
        &["status", "--config", conf][..],
        &["sources", "--config", conf],
        &["sources", "--why", "--config", conf],
        &["sources", "--json", "--config", conf],
    ] {
        let o = gnomon(args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", text(&o));
        assert!(!o.stdout.is_empty(), "{args:?}: the report is still printed");
    }
    let o = gnomon(&["status", "--config", conf]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Synchronised    : no"));
    // Synchronised (to the local clock): 0.
    let synced = Gnomon::start("local_stratum = 10\n");
    let conf = synced.dir.join("gnomon.toml");
    for cmd in ["status", "sources"] {
        let o = gnomon(&[cmd, "--config", conf.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{cmd}: {}", text(&o));
    }
}

#[test]
fn check_config_refuses_host_port_and_echoes_bad_values() {
    let dir = tempdir("check");
    let f = dir.join("g.toml");
    for (addr, hint) in [
        ("127.0.0.1:24123", "address = \"127.0.0.1\" and port = 24123"),
        ("[::1]:123", "address = \"::1\" and port = 123"),
        ("ntp.example:123", "address = \"ntp.example\" and port = 123"),
    ] {
        std::fs::write(&f, format!("[[upstream]]\naddress = \"{addr}\"\n")).unwrap();
        let o = gnomon(&["check-config", f.to_str().unwrap()]);
        assert!(!o.status.success(), "{addr} accepted");
        let err = text(&o);
        assert!(err.contains(&format!("{}:2: key `address`", f.display())), "{err}");
        assert!(err.contains(hint), "{err}");
    }
    std::fs::write(&f, "[[upstream]]\naddress = \"2001:db8::1\"\n").unwrap();
    assert!(gnomon(&["check-config", f.to_str().unwrap()]).status.success());
    std::fs::write(&f, "[[restrict]]\naddress = \"default\"\naction = \"allow\"\n").unwrap();
    let err = text(&gnomon(&["check-config", f.to_str().unwrap()]));
    assert!(
        err.contains(":3: key `action`") && err.contains("got \"allow\""),
        "{err}"
    );
    std::fs::write(&f, "[[upstream]]\naddress = \"a.example\"\nmax_sources = 7\n").unwrap();
    let err = text(&gnomon(&["check-config", f.to_str().unwrap()]));
    assert!(err.contains(":3: key `max_sources`") && err.contains("got 7"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_config_prints_a_summary() {
    let dir = tempdir("summary");
    let f = dir.join("g.toml");
    std::fs::write(
        &f,
        "listen = [\"127.0.0.1:1123\"]\n[[upstream]]\naddress = \"192.0.2.1\"\n\
         [[restrict]]\naddress = \"default\"\naction = \"limited\"\n\
         [[restrict]]\naddress = \"10.0.0.0/8\"\naction = \"deny\"\n[rate_limit]\ninterval = 2.0\n",
    )
    .unwrap();
    let o = gnomon(&["check-config", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in [
        "listen       : 127.0.0.1:1123",
        "sources      : 1 upstream (192.0.2.1)",
        "access rules : 1 (1 deny), default limited",
        "clock mode   : software",
        "rate limit   : 1 request per 2 s",
    ] {
        assert!(out.contains(want), "{want}:\n{out}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Every option and argument of every subcommand (the hidden one too) has a help line.
#[test]
fn every_option_and_argument_has_help() {
    let top = String::from_utf8_lossy(&gnomon(&["--help"]).stdout).to_string();
    let mut subs: Vec<String> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|s| s != "help")
        .collect();
    assert!(subs.len() >= 8, "{top}");
    subs.push("bench-echo".into());
    for sub in subs {
        let help = String::from_utf8_lossy(&gnomon(&[&sub, "--help"]).stdout).to_string();
        let mut section = false;
        let mut seen = 0;
        for l in help.lines() {
            if l == "Options:" || l == "Arguments:" {
                section = true;
                continue;
            }
            if l.is_empty() || !l.starts_with(' ') {
                section = false;
                continue;
            }
            let t = l.trim_start();
            if section && (t.starts_with('-') || t.starts_with('<')) {
                seen += 1;
                // clap puts the description two spaces after the flag or argument name.
                let described = t.split_once("  ").is_some_and(|(_, d)| !d.trim().is_empty());
                assert!(described, "`gnomon {sub}`: `{t}` has no help text\n{help}");
            }
        }
        assert!(seen > 0, "{sub}: {help}");
    }
}

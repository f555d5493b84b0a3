//! `gnomon convert-config` on real config files of ntpd, NTPsec and chrony (fixtures, and the
//! installed chrony.conf): the output passes `gnomon check-config`, carries the rules, sources
//! and LOCAL clock over with the daemons' semantics, and lists the lines it could not carry.

mod common;

use common::{GNOMON, have_tool, tempdir};
use gnomon::config::Config;
use gnomon::policy::Action;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Converts `input` with the real binary, checks the output with the real binary's
/// `check-config`, and returns the loaded config and the not-carried list (stderr).
fn convert(input: &Path, args: &[&str]) -> (Config, String) {
    let dir = tempdir("convert");
    let out = dir.join("gnomon.toml");
    let run = Command::new(GNOMON)
        .arg("convert-config")
        .arg(input)
        .args(args)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let notes = String::from_utf8_lossy(&run.stderr).to_string();
    assert!(run.status.success(), "convert-config {}: {notes}", input.display());
    let check = Command::new(GNOMON).arg("check-config").arg(&out).output().unwrap();
    assert!(
        check.status.success(),
        "check-config refused the converted {}: {}\n{}",
        input.display(),
        String::from_utf8_lossy(&check.stderr),
        std::fs::read_to_string(&out).unwrap()
    );
    let cfg = Config::load(&out).unwrap();
    let _ = std::fs::remove_dir_all(dir);
    (cfg, notes)
}

fn rules(cfg: &Config) -> Vec<(String, Action)> {
    cfg.policy
        .rules
        .iter()
        .map(|r| (r.prefix.to_string(), r.action))
        .collect()
}

/// Each `(line, word)`: the list names `file:line:` with that word in its reason.
fn assert_listed(notes: &str, file: &Path, expect: &[(usize, &str)]) {
    for (line, word) in expect {
        let tag = format!("{}:{line}: ", file.display());
        assert!(
            notes.lines().any(|l| l.starts_with(&tag) && l.contains(word)),
            "{tag} ... {word} not listed in:\n{notes}"
        );
    }
}

#[test]
fn centos_lan_server_with_local_clock() {
    let f = fixture("centos-ntp.conf");
    let (cfg, notes) = convert(&f, &[]);
    assert_eq!(
        cfg.policy.default,
        Action::Serve,
        "nomodify notrap nopeer noquery = serve time"
    );
    assert_eq!(
        rules(&cfg),
        [
            ("127.0.0.1/32".to_string(), Action::Exempt),
            ("::1/128".to_string(), Action::Exempt),
            ("192.168.1.0/24".to_string(), Action::Serve),
        ]
    );
    // The commented-out pool servers stay out; ntpd serves LOCAL one stratum above the fudge.
    assert!(cfg.sync.upstreams.is_empty());
    assert_eq!(cfg.sync.local_stratum, Some(11));
    assert_listed(
        &notes,
        &f,
        &[(4, "drift"), (41, "included"), (45, "authentication"), (63, "monlist")],
    );
    assert!(notes.contains("read as ntp.conf"), "{notes}");
}

#[test]
fn centos_stock_servers_beside_a_local_clock() {
    let f = fixture("centos-stock-ntp.conf");
    let (cfg, notes) = convert(&f, &[]);
    let names: Vec<&str> = cfg.sync.upstreams.iter().map(|u| u.address.as_str()).collect();
    assert_eq!(
        names,
        [
            "0.centos.pool.ntp.org",
            "1.centos.pool.ntp.org",
            "2.centos.pool.ntp.org",
            "3.centos.pool.ntp.org"
        ]
    );
    assert!(cfg.sync.upstreams.iter().all(|u| u.iburst && !u.pool));
    // gnomon serves its own clock only without upstreams: not carried, and said so.
    assert_eq!(cfg.sync.local_stratum, None);
    assert_listed(&notes, &f, &[(28, "fallback")]);
    assert_eq!(rules(&cfg).len(), 2);
}

#[test]
fn debian_ntpsec_conf() {
    let f = fixture("debian-ntpsec-ntp.conf");
    let (cfg, notes) = convert(&f, &[]);
    // restrict default kod nomodify nopeer noquery limited
    assert_eq!(cfg.policy.default, Action::Limited);
    assert!(cfg.policy.rate_limit.kod);
    assert_eq!(cfg.policy.rate_limit.interval, 8.0);
    assert_eq!(rules(&cfg).iter().filter(|r| r.1 == Action::Exempt).count(), 2);
    assert_eq!(cfg.sync.upstreams.iter().filter(|u| u.pool && u.iburst).count(), 4);
    assert_listed(&notes, &f, &[(3, "drift"), (20, "fixed")]);
    // `leapfile` becomes [leap] list (tzdata's file, read when the converted config is).
    assert!(cfg.sync.leap.list.is_some());
    // Installed too? Then it converts as well (ntpsec is not something .ci/run installs).
    let installed = Path::new("/etc/ntpsec/ntp.conf");
    if installed.exists() {
        convert(installed, &[]);
    }
}

fn check_debian_chrony(f: &Path) {
    let (cfg, notes) = convert(f, &[]);
    // No `allow`: chronyd serves nobody, and so does the converted file.
    assert_eq!(cfg.policy.default, Action::Ignore);
    assert!(cfg.policy.rules.is_empty());
    let pool = cfg
        .sync
        .upstreams
        .iter()
        .find(|u| u.pool)
        .expect("the Debian vendor pool");
    assert!(pool.address.ends_with("debian.pool.ntp.org") && pool.iburst);
    // Debian's `makestep 1 3` is carried over as it is.
    let makestep = cfg.sync.makestep.expect("makestep carried over");
    assert_eq!((makestep.threshold, makestep.limit), (1.0, Some(3)));
    for (word, why) in [
        ("rtcsync", "real-time clock"),
        ("keyfile", "authentication"),
        ("driftfile", "drift"),
        ("ntsdumpdir", "NTS"),
        ("logdir", "log"),
        ("leapsectz", "leap"),
        ("sourcedir", "dynamic sources"),
        ("confdir", "included"),
    ] {
        assert!(
            notes
                .lines()
                .any(|l| l.contains(&format!("`{word}")) && l.contains(why)),
            "{word} not listed with `{why}`:\n{notes}"
        );
    }
}

#[test]
fn debian_chrony_conf_fixture() {
    check_debian_chrony(&fixture("debian-chrony.conf"));
}

#[test]
fn debian_chrony_conf_as_installed() {
    let f = "/etc/chrony/chrony.conf";
    if have_tool(f) {
        check_debian_chrony(Path::new(f));
    }
}

#[test]
fn chrony_server_config_with_allow_and_ratelimit() {
    let dir = tempdir("chrony-srv");
    let f = dir.join("chrony.conf");
    std::fs::write(
        &f,
        "server 127.0.0.1 port 11123 iburst minpoll 0 maxpoll 2\n\
         pool pool.example iburst maxsources 3\n\
         allow 192.168.0.0/16\ndeny 192.168.7\nallow ::1\n\
         ratelimit interval 2 burst 4 leak 1\nlocal stratum 9\n",
    )
    .unwrap();
    let (cfg, notes) = convert(&f, &[]);
    assert_eq!(cfg.policy.default, Action::Ignore);
    assert_eq!(
        rules(&cfg),
        [
            ("192.168.0.0/16".to_string(), Action::Limited),
            ("192.168.7.0/24".to_string(), Action::Ignore),
            ("::1/128".to_string(), Action::Limited),
        ]
    );
    let rl = cfg.policy.rate_limit;
    assert_eq!(
        (rl.interval, rl.burst, rl.leak),
        (4.0, 4, 2),
        "interval 2 = 2^2 s, leak 1 = 1 in 2"
    );
    let pool = cfg.sync.upstreams.iter().find(|u| u.pool).unwrap();
    assert_eq!(pool.max_sources, 3);
    assert_listed(&notes, &f, &[(7, "fallback")]);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn format_override_and_undetectable_input() {
    let dir = tempdir("convert-from");
    let f = dir.join("servers");
    std::fs::write(&f, "server 192.0.2.1 iburst\n").unwrap();
    let out = Command::new(GNOMON).arg("convert-config").arg(&f).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--from"), "{out:?}");
    let (cfg, notes) = convert(&f, &["--from", "chrony"]);
    assert_eq!(cfg.policy.default, Action::Ignore, "chrony without allow");
    assert!(notes.contains("read as chrony.conf"), "{notes}");
    let (cfg, _) = convert(&f, &["--from", "ntp"]);
    assert_eq!(cfg.policy.default, Action::Serve, "ntpd without restrict");
    // Without -o the config goes to stdout and the list to stderr.
    let out = Command::new(GNOMON)
        .args(["convert-config", "--from", "ntp"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success());
    let toml = String::from_utf8(out.stdout).unwrap();
    let cfg = Config::parse(&toml, "stdout").unwrap();
    assert_eq!(cfg.sync.upstreams[0].address, "192.0.2.1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 item(s) not carried over"));
    let _ = std::fs::remove_dir_all(dir);
}

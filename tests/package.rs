//! The Debian package: `cargo deb` builds it from `[package.metadata.deb]`, and unpacked into a
//! scratch root it holds the binary, unit, config, man pages and completions where the unit and
//! the tools expect them; the unit passes `systemd-analyze verify`.
//!
//! The package is made from the binary this test run built (`cargo deb --no-build --profile
//! dev`): a release build (fat LTO) would cost CI minutes, and the layout is the same.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
const UNIT: &str = "usr/lib/systemd/system/gnomon.service";

/// `name` on PATH, if anywhere.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> String {
    let (ok, out) = run_bounded(cmd, Duration::from_secs(120));
    assert!(ok, "{cmd:?} failed:\n{out}");
    out
}

/// Builds the package and unpacks it: (scratch root, control files).
fn build_and_unpack(dir: &Path) -> Option<(PathBuf, PathBuf)> {
    let cargo_deb = on_path("cargo-deb");
    if !have_tool(&cargo_deb.map_or("cargo-deb (cargo install cargo-deb)".into(), |p| {
        p.display().to_string()
    })) {
        return None;
    }
    // The man pages and completions, where the assets (target/release/assets/, which cargo-deb
    // maps to this profile's directory) expect them.
    let assets = Path::new(GNOMON).parent().unwrap().join("assets");
    run(Command::new(GNOMON).arg("generate").arg(&assets));
    let deb = dir.join("gnomon.deb");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo)
        .args(["deb", "--no-build", "--profile", "dev", "--output"])
        .arg(&deb)
        .current_dir(MANIFEST_DIR));
    let (root, control) = (dir.join("root"), dir.join("control"));
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    Some((root, control))
}

/// The program of each `Exec*=` line of a unit, without systemd's prefixes (`-`, `+`, `!`...).
fn exec_programs(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter(|l| l.starts_with("Exec"))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            let prog = v
                .trim_start_matches(['-', '@', ':', '+', '!'])
                .split_whitespace()
                .next();
            (k.to_string(), prog.unwrap_or_default().to_string())
        })
        .collect()
}

#[test]
fn the_package_installs_everything_where_the_unit_and_tools_look() {
    let dir = tempdir("deb");
    let Some((root, control)) = build_and_unpack(&dir) else {
        return;
    };

    let bin = root.join("usr/bin/gnomon");
    let mode = std::fs::metadata(&bin)
        .expect("no /usr/bin/gnomon")
        .permissions()
        .mode();
    assert_eq!(mode & 0o111, 0o111, "/usr/bin/gnomon mode {mode:o}");
    let version = run(Command::new(&bin).arg("--version"));
    assert!(version.starts_with("gnomon "), "{version}");

    // The config, as a conffile, is the shipped default.
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles.lines().any(|l| l == "/etc/gnomon/gnomon.toml"),
        "conffiles: {conffiles}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/gnomon/gnomon.toml")).unwrap(),
        std::fs::read_to_string(Path::new(MANIFEST_DIR).join("deploy/gnomon.toml")).unwrap()
    );

    // The unit is deploy/gnomon.service as it is.
    let unit = std::fs::read_to_string(root.join(UNIT)).expect("no unit");
    assert_eq!(
        unit,
        std::fs::read_to_string(Path::new(MANIFEST_DIR).join("deploy/gnomon.service")).unwrap()
    );
    // Every gnomon the unit runs is the packaged one, and every /etc/gnomon file it names is there.
    let programs = exec_programs(&unit);
    assert!(
        programs.iter().any(|(k, _)| k == "ExecStart"),
        "no ExecStart in\n{unit}"
    );
    for (key, prog) in &programs {
        if prog.contains("gnomon") {
            assert_eq!(
                prog, "/usr/bin/gnomon",
                "{key} runs {prog}, which the package does not install"
            );
        }
    }
    for word in unit.split_whitespace().filter(|w| w.starts_with("/etc/gnomon/")) {
        let word = word.trim_end_matches(['"', '\'']);
        assert!(
            root.join(&word[1..]).exists(),
            "the unit names {word}, which the package does not install"
        );
    }

    // A man page per subcommand that `gnomon --help` lists, and the completions for each shell.
    let help = run(Command::new(&bin).arg("--help"));
    let commands = help
        .split("Commands:\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help");
    let man = root.join("usr/share/man/man1");
    assert!(man.join("gnomon.1").is_file(), "no gnomon.1");
    let mut n = 0;
    for c in commands {
        let page = man.join(format!("gnomon-{c}.1"));
        let text = std::fs::read_to_string(&page).unwrap_or_else(|_| panic!("no {}", page.display()));
        assert!(text.starts_with(".ie"), "{} is not roff", page.display());
        n += 1;
    }
    assert!(n >= 5, "only {n} subcommands in\n{help}");
    for (path, shell_word) in [
        ("usr/share/bash-completion/completions/gnomon", "complete"),
        ("usr/share/zsh/vendor-completions/_gnomon", "#compdef gnomon"),
        ("usr/share/fish/vendor_completions.d/gnomon.fish", "complete -c gnomon"),
    ] {
        let text = std::fs::read_to_string(root.join(path)).unwrap_or_else(|_| panic!("no /{path}"));
        assert!(text.contains(shell_word), "/{path} is not a completion");
    }
    assert!(root.join("usr/share/doc/gnomon/README.md").is_file());
    assert!(root.join("usr/lib/firewalld/services/gnomon.xml").is_file());
    // The system-clock drop-in is an example to copy, never active in the unit's own .d.
    assert!(
        root.join("usr/share/doc/gnomon/examples/gnomon-system-clock.conf")
            .is_file()
    );
    assert!(!root.join("usr/lib/systemd/system/gnomon.service.d").exists());

    // The gnomon system user: sysusers.d, run by postinst.
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(postinst.contains("systemd-sysusers"), "postinst:\n{postinst}");
    // No time-daemon: in software mode gnomon does not discipline the host clock.
    let fields = std::fs::read_to_string(control.join("control")).unwrap();
    assert!(!fields.contains("time-daemon"), "control:\n{fields}");
    if have_tool("/usr/bin/systemd-sysusers") {
        run(Command::new("systemd-sysusers").arg(format!("--root={}", root.display())));
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
        let user = passwd
            .lines()
            .find(|l| l.starts_with("gnomon:"))
            .expect("no gnomon user");
        assert!(user.ends_with(":/usr/sbin/nologin"), "{user}");
    }

    // systemd-analyze of this Debian (252) wants a whole systemd tree under --root, so the unit
    // is verified in place of the host's with its gnomon pointing into the scratch root.
    if have_tool("/usr/bin/systemd-analyze") {
        // Every unit of the package (a socket unit too, if it has one), so they find each other.
        let verify = dir.join("verify");
        std::fs::create_dir_all(&verify).unwrap();
        let mut units = Vec::new();
        for entry in std::fs::read_dir(root.join(UNIT).parent().unwrap()).unwrap() {
            let entry = entry.unwrap().path();
            if entry.is_file() {
                let text = std::fs::read_to_string(&entry).unwrap();
                let copy = verify.join(entry.file_name().unwrap());
                std::fs::write(&copy, text.replace("/usr/bin/gnomon", &bin.display().to_string())).unwrap();
                units.push(copy);
            }
        }
        let (ok, out) = run_bounded(
            Command::new("systemd-analyze").arg("verify").args(&units),
            Duration::from_secs(60),
        );
        assert!(ok && out.trim().is_empty(), "systemd-analyze verify:\n{out}");
        let (_, out) = run_bounded(
            Command::new("systemd-analyze")
                .args(["security", "--offline=true", "--no-pager"])
                .arg(verify.join("gnomon.service")),
            Duration::from_secs(60),
        );
        let score = out
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .unwrap_or("no score");
        say(&format!(
            "systemd-analyze security of the packaged unit: {}",
            score.trim()
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// firewalld's own reader (python3-firewall) accepts the service file and reads UDP 123 from it.
#[test]
fn the_firewalld_service_file_is_valid() {
    if !have_tool("/usr/lib/python3/dist-packages/firewall/core/io/service.py") {
        return;
    }
    let out = run(Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import sys\nfrom firewall.core.io.service import service_reader\n\
             s = service_reader('gnomon.xml', sys.argv[1])\nprint(s.name, s.ports)",
        ])
        .arg(Path::new(MANIFEST_DIR).join("deploy/firewalld")));
    assert_eq!(out.trim(), "gnomon [('123', 'udp')]");
}

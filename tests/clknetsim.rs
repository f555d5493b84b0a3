//! chrony's scenarios on clknetsim, the simulator chrony's own test suite runs on (issue 12): gnomon
//! as the client of a chronyd stratum-1 server, and as the stratum-2 server of a chronyd client
//! (served time). Each row of `tests/clknetsim/compare.sh` that gnomon passes is asserted against
//! chrony's `check_sync` thresholds as the scenario sets them; rows that do not pass yet are named
//! in [`KNOWN_FAILING`] and, with `GNOMON_CLKNETSIM_ALL=1`, run and reported without failing.
//! The table of both chronyd and gnomon: `tests/clknetsim/compare.sh`.
//!
//! clknetsim is built from `../shared/clknetsim` (or `$GNOMON_CLKNETSIM`) into
//! `target/clknetsim`; without the sources or a C compiler the test is skipped.

mod common;

use common::{CHRONYD, have_tool, run_bounded};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Rows (label:seed, see `compare.sh --list`) gnomon passes: asserted. A row takes about 30 s
/// with the debug binary, so only these run by default.
const ASSERTED: &[&str] = &["001-defaults:1", "101-poll4:1", "102-iburst:1"];

/// Rows gnomon passes too, asserted when `GNOMON_CLKNETSIM_ALL=1` (about 30 s each, 011 five
/// minutes).
const ASSERTED_LONG: &[&str] = &[
    "001-defaults:2",
    "001-defaults:3",
    "003-freq-5000ppm:1",
    "003-freq+5000ppm:1",
    "004-time-100s:1",
    "004-time+100s:1",
    "006-largejitter:1",
    "007-largewander:1",
    "011-asymjitter:1",
    "101-poll6:1",
    "101-poll8:1",
    "served-system:1",
    "served-software:1",
];

/// Rows gnomon does not pass yet; each fix moves its rows to [`ASSERTED`] or
/// [`ASSERTED_LONG`]. (Within chrony's thresholds is not yet within 1.2x of chronyd's rms:
/// `compare.sh` shows both.)
/// 113: leap seconds are not handled yet (issue 12, item 2), and under clknetsim gnomon spins
/// while its node waits for its start at 2 h, so the row takes over 15 minutes.
const KNOWN_FAILING: &[&str] = &["113-leap-insert:1"];

/// 10,000 simulated seconds take about 30 s with the debug binary; 011 simulates 100,000.
const RUN_LIMIT: Duration = Duration::from_secs(900);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clknetsim/compare.sh")
}

/// One `compare.sh --run` row with gnomon: whether it passed chrony's checks (`None`: it did not
/// finish), and the RESULT line or the output.
fn run_row(row: &str) -> (Option<bool>, String) {
    let (ok, out) = run_bounded(
        Command::new(script())
            .args(["--run", row, "gnomon"])
            .env("GNOMON", common::GNOMON),
        RUN_LIMIT,
    );
    match out.lines().find(|l| l.starts_with("RESULT ")) {
        Some(l) if ok => (Some(l.split_whitespace().nth(4) == Some("pass")), l.to_string()),
        _ => (None, format!("compare.sh --run {row} did not finish:\n{out}")),
    }
}

/// Whether clknetsim can be built here; prints the reason when not.
fn can_build() -> bool {
    let sources = Command::new(script())
        .arg("--sources")
        .output()
        .expect("run compare.sh");
    if !sources.status.success() {
        eprintln!(
            "SKIPPED: clknetsim sources not found (../shared/clknetsim next to the repo, or set \
             GNOMON_CLKNETSIM)"
        );
        return false;
    }
    for tool in ["gcc", "g++", "make", "flock"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            eprintln!("SKIPPED: clknetsim needs {tool} to build");
            return false;
        }
    }
    true
}

#[test]
fn chrony_scenarios_on_clknetsim() {
    // Node 1 (the stratum-1 server) is always chronyd.
    if !have_tool(CHRONYD) || !can_build() {
        return;
    }
    let (built, out) = run_bounded(Command::new(script()).arg("--build"), Duration::from_secs(300));
    assert!(built, "building clknetsim failed:\n{out}");
    let all = std::env::var_os("GNOMON_CLKNETSIM_ALL").is_some();
    let mut failed = Vec::new();
    for row in ASSERTED.iter().chain(ASSERTED_LONG.iter().filter(|_| all)) {
        let (pass, line) = run_row(row);
        eprintln!("{line}");
        if pass != Some(true) {
            failed.push(line);
        }
    }
    if !all {
        eprintln!(
            "NOT RUN (GNOMON_CLKNETSIM_ALL=1 runs them): asserted {}; known failing {}",
            ASSERTED_LONG.join(" "),
            KNOWN_FAILING.join(" ")
        );
    }
    for row in KNOWN_FAILING.iter().filter(|_| all) {
        let (pass, line) = run_row(row);
        let tag = match pass {
            Some(true) => "now passes, move it to ASSERTED",
            Some(false) => "still failing",
            None => "did not finish",
        };
        eprintln!("KNOWN-FAILING ({tag}): {line}");
    }
    assert!(
        failed.is_empty(),
        "rows outside chrony's thresholds (RESULT label seed impl ok sync max_time max_freq \
         rms_time rms_freq rms_after_FROM FROM packets limits):\n{}",
        failed.join("\n")
    );
}

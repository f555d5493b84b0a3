//! What an operator learns without asking: log lines for a source lost and back and for a
//! refused reload; and what they learn by asking about one client: `explain` and `clients`
//! against several 127.x sources under different rules; `ntpq`'s 12-byte mode 6 request counted
//! as control mode.

mod common;
use common::*;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The first log line containing `what`, from start-up on, waiting up to `limit` for it; else
/// the lines seen meanwhile.
fn wait_log(srv: &Gnomon, what: &str, limit: Duration) -> Result<String, Vec<String>> {
    if let Some(l) = srv.startup_log.iter().find(|l| l.contains(what)) {
        return Ok(l.clone());
    }
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match srv.log.recv_timeout(left) {
            Ok(l) if l.contains(what) => return Ok(l),
            Ok(l) => seen.push(l),
            Err(_) => break,
        }
    }
    Err(seen)
}

#[test]
fn a_source_lost_and_back_is_logged_once_each_way() {
    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let (p, answer) = (paused.clone(), fake_answer(0));
    let (port, upstream) = udp_server(
        stop.clone(),
        move |req| {
            if p.load(Ordering::Relaxed) { None } else { answer(req) }
        },
    );
    let srv = Gnomon::start(&format!(
        "[[upstream]]\naddress = \"127.0.0.1\"\nport = {port}\niburst = true\nminpoll = 0\nmaxpoll = 0\n"
    ));
    let who = format!("127.0.0.1:{port}");
    let line = |what: &str, limit: u64| {
        wait_log(&srv, what, Duration::from_secs(limit)).unwrap_or_else(|seen| {
            let now = srv.ctl(&["sources", "--why"]);
            let now = String::from_utf8_lossy(&now.stdout).to_string();
            panic!("no log line `{what}` within {limit} s; lines: {seen:#?}; sources now:\n{now}")
        })
    };
    line(&format!("source {who} reachable"), 10);
    line(&format!("source {who} selected (system peer)"), 20);
    line("synchronised: stratum 2", 20);
    paused.store(true, Ordering::Relaxed);
    // One poll a second: eight unanswered polls empty the reach register.
    let lost = line(&format!("source {who} unreachable: unreachable (no reply to"), 30);
    assert!(lost.contains("warn"), "a loss is a warning: {lost}");
    line(&format!("source {who} deselected"), 5);
    line("holdover: no source selected", 5);
    paused.store(false, Ordering::Relaxed);
    let back = line(&format!("source {who} reachable again"), 15);
    assert!(back.contains("info"), "a recovery is info: {back}");
    // Everything said once: no second "unreachable" line came with the first one.
    let s = srv.ctl(&["sources", "--why"]);
    assert!(String::from_utf8_lossy(&s.stdout).contains(&who));
    stop.store(true, Ordering::Relaxed);
    upstream.join().unwrap();
}

#[test]
fn a_refused_reload_is_logged_and_the_old_policy_stays() {
    let srv = Gnomon::start("local_stratum = 3\n");
    let path = srv.dir.join("gnomon.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("{good}[[restrict]]\naddress = \"10.0.0.0/33\"\naction = \"deny\"\n"),
    )
    .unwrap();
    let out = srv.ctl(&["reload"]);
    assert!(!out.status.success() || String::from_utf8_lossy(&out.stdout).contains("error"));
    let l = wait_log(&srv, "reload refused", Duration::from_secs(5))
        .unwrap_or_else(|seen| panic!("no `reload refused` line: {seen:#?}"));
    assert!(l.contains("gnomon.toml") && l.contains("old policy kept"), "{l}");
    let r = exchange(&client(srv.addr()), srv.addr(), &request(4, 3, 7));
    assert!(r.is_some(), "still serving after a refused reload");
    std::fs::write(&path, good).unwrap();
    let out = srv.ctl(&["reload"]);
    assert!(out.status.success());
    wait_log(&srv, "reloaded", Duration::from_secs(5)).expect("an applied reload is logged");
}

#[test]
fn a_short_mode_6_request_counts_as_control_mode_and_is_not_answered() {
    let srv = Gnomon::start("local_stratum = 3\n");
    let target: SocketAddr = srv.addr();
    // `ntpq -p`'s first datagram: version 2, mode 6, READVAR, 12 bytes.
    let ntpq = [0x16, 0x02, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
    assert!(
        exchange(&client(target), target, &ntpq).is_none(),
        "mode 6 is never answered"
    );
    assert_eq!(srv.wait_counter("drop_control_mode", 1), 1);
    assert_eq!(srv.counter("drop_too_short"), 0);
}

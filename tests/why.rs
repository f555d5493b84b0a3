//! What an operator learns without asking: log lines for a source lost and back and for a
//! refused reload; and what they learn by asking about one client: `explain` and `clients`
//! against several 127.x sources under different rules; `ntpq`'s 12-byte mode 6 request counted
//! as control mode.

mod common;
use common::*;
use std::net::SocketAddr;
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
    if !have_tool(CHRONYD) {
        return;
    }
    if !is_root() {
        skip("chronyd with its own pidfile and port needs root here");
        return;
    }
    let dir = tempdir("lostandback");
    let upstream = start_chronyd(&dir, 0);
    let port = upstream.port;
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
    // The upstream daemon stops; one poll a second: eight unanswered polls empty the reach register.
    drop(upstream);
    let lost = line(&format!("source {who} unreachable: unreachable (no reply to"), 30);
    assert!(lost.contains("warn"), "a loss is a warning: {lost}");
    line(&format!("source {who} deselected"), 5);
    line("holdover: no source selected", 5);
    // And starts again where gnomon expects it.
    let _upstream = start_chronyd_on(&dir, 1, port);
    let back = line(&format!("source {who} reachable again"), 15);
    assert!(back.contains("info"), "a recovery is info: {back}");
    let s = srv.ctl(&["sources", "--why"]);
    assert!(String::from_utf8_lossy(&s.stdout).contains(&who));
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

const RULES: &str = r#"
[[restrict]]
address = "default"
action = "limited"

[[restrict]]
address = "127.0.5.0/24"
action = "deny"

[[restrict]]
address = "127.0.6.0/24"
action = "ignore"

[[restrict]]
address = "127.0.4.0/24"
action = "serve"

[rate_limit]
interval = 5.0
burst = 2
leak = 0
"#;

/// The 1-based line of the config that contains `text`.
fn line_of(srv: &Gnomon, text: &str) -> usize {
    let cfg = std::fs::read_to_string(srv.dir.join("gnomon.toml")).unwrap();
    cfg.lines().position(|l| l.contains(text)).expect("in the config") + 1
}

fn explain(srv: &Gnomon, addr: &str) -> String {
    let out = srv.ctl(&["explain", addr]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn explain_names_the_rule_its_line_and_the_rate_limit_state() {
    let srv = Gnomon::start(&format!("listen = [\"0.0.0.0:0\"]\nlocal_stratum = 2\n{RULES}"));
    let target: SocketAddr = format!("127.0.0.1:{}", srv.addr().port()).parse().unwrap();
    let file = srv.dir.join("gnomon.toml").display().to_string();
    let e = explain(&srv, "127.0.6.3");
    let want = format!(
        "restrict 127.0.6.0/24 action ignore ({file}:{})",
        line_of(&srv, "127.0.6.0/24")
    );
    assert!(e.contains(&want), "{e}\nwanted {want}");
    assert!(e.contains("action          ignore: dropped"), "{e}");
    let e = explain(&srv, "127.0.5.77");
    assert!(
        e.contains(&format!("action deny ({file}:{})", line_of(&srv, "127.0.5.0/24"))),
        "{e}"
    );
    let e = explain(&srv, "127.0.4.1");
    assert!(e.contains("action serve") && e.contains("not applied"), "{e}");
    // The default rule, then the same client's rate-limit state before and after a burst.
    let e = explain(&srv, "127.0.9.9");
    let want = format!("default action limited ({file}:{})", line_of(&srv, "\"default\""));
    assert!(e.contains(&want), "{e}\nwanted {want}");
    assert!(e.contains("idle: a burst of 2"), "{e}");
    let (served, _) = send_paced("127.0.9.9", target, 6, 200.0);
    assert_eq!(served, 2, "burst 2, interval 5 s");
    let e = explain(&srv, "127.0.9.9");
    assert!(e.contains("over the limit"), "{e}");
    assert_eq!(explain(&srv, "127.0.9.9").lines().count(), e.lines().count());
    assert!(explain(&srv, "::1").contains("default action limited"));
    let bad = srv.ctl(&["explain", "not-an-address"]);
    assert!(!bad.status.success(), "clap refuses a non-address");
}

#[test]
fn clients_shows_the_busiest_by_requests_and_by_drops_from_samples() {
    let srv = Gnomon::start(&format!("listen = [\"0.0.0.0:0\"]\nlocal_stratum = 2\n{RULES}"));
    let target: SocketAddr = format!("127.0.0.1:{}", srv.addr().port()).parse().unwrap();
    let (heavy, ignored, limited) = (from("127.0.4.1"), from("127.0.6.3"), from("127.0.9.9"));
    let req = request(4, 3, 1);
    // Interleaved, so each worker's 1-in-64 countdown meets every client in proportion:
    // 4000 served, 2000 ignored, 2000 rate limited (burst 2), in paced bursts.
    for round in 0..2000 {
        for _ in 0..2 {
            heavy.send_to(&req, target).unwrap();
        }
        ignored.send_to(&req, target).unwrap();
        limited.send_to(&req, target).unwrap();
        if round % 25 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    srv.wait_counter("received", 8000);
    let out = srv.ctl(&["clients", "--top", "5"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    say(&text);
    assert!(text.starts_with("sampled 1 in 64 requests"), "{text}");
    let (by_requests, by_drops) = text.split_once("top 5 by drops:").unwrap();
    let rows = |part: &str| -> Vec<(String, u64, u64)> {
        part.lines()
            .filter(|l| l.starts_with("127."))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0].to_string(), f[1].parse().unwrap(), f[3].parse().unwrap())
            })
            .collect()
    };
    let r = rows(by_requests);
    assert_eq!(r[0].0, "127.0.4.1", "{text}");
    assert!(
        (2000..=6000).contains(&r[0].1),
        "4000 sent, estimated {}: {text}",
        r[0].1
    );
    assert_eq!(r[0].2, 0, "served, none dropped");
    let d = rows(by_drops);
    assert_eq!(d.len(), 2, "only the two dropped clients have drops: {text}");
    for (ip, _, dropped) in &d {
        assert!(ip == "127.0.6.3" || ip == "127.0.9.9", "{text}");
        assert!(
            (1000..=3000).contains(dropped),
            "2000 dropped, estimated {dropped}: {text}"
        );
    }
}

#[test]
fn status_and_query_show_one_refid_text() {
    let srv = Gnomon::start("local_stratum = 3\n");
    let status = srv.ctl(&["status"]);
    let status = String::from_utf8_lossy(&status.stdout).to_string();
    let refid = |text: &str, key: &str| -> String {
        let line = text
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} in {text}"));
        line[key.len()..].trim_start_matches([' ', ':']).trim().to_string()
    };
    let query = std::process::Command::new(GNOMON)
        .args(["query", &srv.addr().to_string()])
        .output()
        .unwrap();
    let query = String::from_utf8_lossy(&query.stdout).to_string();
    assert_eq!(
        refid(&status, "Reference ID"),
        refid(&query, "refid"),
        "{status}\n{query}"
    );
    assert_eq!(refid(&query, "refid"), "76.79.67.76 (LOCL)");
}

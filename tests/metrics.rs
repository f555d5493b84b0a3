//! The Prometheus endpoint of a running `gnomon serve`, scraped after a bounded gnomon-load run
//! (a served population and a denied abuser) plus a few malformed datagrams: every counter of
//! every worker agrees with `gnomon stats --json`, the totals with what the generator sent and
//! got back, the sync gauges with `gnomon sources --json`, and `promtool check metrics` accepts
//! the text.

mod common;

use common::*;
use gnomon::control::metrics::counter_metric;
use gnomon::server::stats::Counter;
use gnomon_load::{Abuser, Kiss, RunConfig, Shape, run};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PROMTOOL: &str = "/usr/bin/promtool";

/// One sample: name and labels (sorted), as a key.
type Series = (String, BTreeMap<String, String>);

/// Parses the text exposition format (enough of it for gnomon's output: escaped label values
/// included, no timestamps).
fn parse(text: &str) -> HashMap<Series, f64> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let (name, mut rest) = match series.split_once('{') {
            Some((n, r)) => (n, r.strip_suffix('}').unwrap_or_else(|| panic!("no }}: {line}"))),
            None => (series, ""),
        };
        let mut labels = BTreeMap::new();
        while !rest.is_empty() {
            let (k, r) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad labels: {line}"));
            let mut v = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => v.push('\n'),
                        Some((_, c)) => v.push(c),
                        None => panic!("bad escape: {line}"),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => v.push(c),
                    None => panic!("unterminated label: {line}"),
                }
            };
            labels.insert(k.to_string(), v);
            rest = r[end + 1..].trim_start_matches(',');
        }
        assert!(
            out.insert((name.to_string(), labels), value).is_none(),
            "duplicate series: {line}"
        );
    }
    out
}

fn series(name: &str, labels: &[(&str, &str)]) -> Series {
    let l = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    (name.to_string(), l)
}

/// The series a worker counter is exported as.
fn counter_series(c: Counter, worker: &str) -> Series {
    let (family, split) = counter_metric(c);
    let mut labels = vec![("worker", worker)];
    labels.extend(split);
    series(family.name, &labels)
}

/// GET /metrics: the status line, the headers and the body.
fn scrape(addr: SocketAddr) -> (String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.to_string(), body.to_string())
}

/// Reads the server's log until `needle` and returns the rest of that line (bounded in time).
fn log_after(g: &Gnomon, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = g
            .log
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log line with `{needle}` within 10 s"));
        if let Some(rest) = line.split(needle).nth(1) {
            return rest.to_string();
        }
    }
}

#[test]
fn metrics_agree_with_stats_and_the_generator_under_load() {
    // The abuser's subnet is denied: its requests end as KoD DENY or, over the rate limit, dropped.
    let mut g = Gnomon::start(
        "listen = [\"127.0.0.1:0\"]\nworkers = 2\nlocal_stratum = 3\n\
         [[restrict]]\naddress = \"127.9.0.0/16\"\naction = \"deny\"\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n",
    );
    let metrics: SocketAddr = log_after(&g, "metrics on ")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .expect("the bound metrics address in the log");
    assert!(metrics.ip().is_loopback() && metrics.port() != 0, "{metrics}");

    // Malformed datagrams, counted by reason and never answered.
    let sock = client(g.addr());
    let (too_short, control_mode) = (3u64, 2u64);
    for _ in 0..too_short {
        sock.send_to(&[0x23; 20], g.addr()).unwrap();
    }
    for i in 0..control_mode {
        sock.send_to(&request(2, 6, i + 1), g.addr()).unwrap();
    }
    let malformed = too_short + control_mode;

    let SocketAddr::V4(target) = g.addr() else {
        unreachable!()
    };
    let report = run(&RunConfig {
        target,
        shape: Shape::Fixed { rate: 2000.0 },
        duration: Duration::from_secs(2),
        max_packets: 4_000,
        clients: 200,
        abusers: vec![Abuser {
            addr: Ipv4Addr::new(127, 9, 0, 1),
            rate: 100.0,
        }],
        drain: Duration::from_millis(300),
        ..RunConfig::default()
    })
    .expect("load run");
    assert!(report.sent >= 2_000, "sent only {}", report.sent);
    assert_eq!(report.invalid_total, 0, "invalid replies {:?}", report.invalid);
    let population = &report.streams[0];
    let abuser = &report.streams[1];

    // Workers publish every 200 ms and when idle: wait past that, then read until two scrapes
    // and the stats between them agree (bounded).
    std::thread::sleep(Duration::from_millis(500));
    let deadline = Instant::now() + Duration::from_secs(5);
    let (head, text, m, stats) = loop {
        let (head, text) = scrape(metrics);
        let stats = g.stats();
        let (_, again) = scrape(metrics);
        let (m, m2) = (parse(&text), parse(&again));
        let counters_equal = Counter::ALL.iter().all(|&c| {
            (0..stats["workers"].as_array().unwrap().len()).all(|w| {
                let s = counter_series(c, &w.to_string());
                m.get(&s) == m2.get(&s)
                    && m.get(&s).copied() == stats["workers"][w]["counters"][c.name()].as_u64().map(|v| v as f64)
            })
        });
        if counters_equal || Instant::now() > deadline {
            break (head, text, m, stats);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(head.starts_with("HTTP/1.0 200 OK"), "{head}");
    assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");

    // Every counter of every worker, as `gnomon stats` shows it, and the totals.
    let workers = stats["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    let total = |c: Counter| -> u64 {
        let mut sum = 0;
        for (w, view) in workers.iter().enumerate() {
            let want = view["counters"][c.name()].as_u64().unwrap();
            let got = m.get(&counter_series(c, &w.to_string()));
            assert_eq!(got.copied(), Some(want as f64), "{c:?} of worker {w}");
            sum += want;
        }
        assert_eq!(sum, stats["total"]["counters"][c.name()].as_u64().unwrap(), "{c:?}");
        sum
    };
    let received = total(Counter::Received);
    let answered = total(Counter::Answered);
    let kod_deny = total(Counter::KodDeny);
    let rate_limited = total(Counter::RateLimited);
    let rule_serve = total(Counter::RuleServe);
    let rule_deny = total(Counter::RuleDeny);
    let rx_queue = total(Counter::KernelRxQueue);
    for c in Counter::ALL {
        total(c);
    }
    // The ntpd-rs names operators graph, spelled out here rather than taken from the mapping.
    let sum = |name: &str| -> f64 { m.iter().filter(|((n, _), _)| n == name).map(|(_, v)| v).sum() };
    assert_eq!(sum("ntp_server_received_packets_total"), received as f64);
    assert_eq!(sum("ntp_server_accepted_packets_total"), answered as f64);
    assert_eq!(sum("ntp_server_denied_packets_total"), kod_deny as f64);
    assert_eq!(sum("ntp_server_rate_limited_packets_total"), rate_limited as f64);

    // Against what the generator and this test sent and got back.
    assert_eq!(
        received + rx_queue,
        report.sent + malformed,
        "every datagram sent is counted once"
    );
    let dropped = |reason: &str| -> f64 {
        m.iter()
            .filter(|((n, l), _)| n == "ntp_server_dropped_packets_total" && l["reason"] == reason)
            .map(|(_, v)| v)
            .sum()
    };
    assert_eq!(dropped("too_short"), too_short as f64);
    assert_eq!(dropped("control_mode"), control_mode as f64);
    if rx_queue == 0 {
        assert_eq!(rule_serve, population.sent, "the population meets the default rule");
        assert_eq!(rule_deny, abuser.sent, "the abuser meets the deny rule");
    }
    assert_eq!(
        kod_deny + rate_limited,
        rule_deny,
        "a denied request is answered DENY or dropped"
    );
    assert!(
        kod_deny > 0 && rate_limited > 0,
        "DENY {kod_deny}, rate limited {rate_limited}"
    );
    let denies_seen = report.kiss_count(Kiss::Deny);
    assert_eq!(abuser.replies, denies_seen);
    assert!(
        denies_seen > 0 && denies_seen <= kod_deny,
        "generator saw {denies_seen} DENY of {kod_deny}"
    );
    assert_eq!(report.good, population.replies);
    assert!(population.replies <= answered - kod_deny);
    if population.replies == population.sent {
        assert_eq!(
            answered - kod_deny,
            population.replies,
            "no loss: answered = generator's replies"
        );
    }

    // Histograms: as many latency samples and batches as `gnomon stats` counted.
    for (w, view) in workers.iter().enumerate() {
        let ws = w.to_string();
        let count = m[&series("ntp_server_processing_latency_seconds_count", &[("worker", &ws)])];
        assert_eq!(count, view["latency"]["count"].as_u64().unwrap() as f64, "worker {w}");
        let inf = m[&series(
            "ntp_server_processing_latency_seconds_bucket",
            &[("worker", &ws), ("le", "+Inf")],
        )];
        assert_eq!(inf, count);
        let batches = m[&series("ntp_server_batch_size_packets_count", &[("worker", &ws)])];
        assert_eq!(
            batches,
            view["counters"]["batches"].as_u64().unwrap() as f64,
            "worker {w}"
        );
    }
    assert!(m[&series("ntp_server_processing_latency_seconds_sum", &[("worker", "0")])] > 0.0);

    // Sync state as `gnomon sources --json` reports it, and build info.
    let out = g.ctl(&["sources", "--json"]);
    let sync: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sources json");
    let system = &sync["system"];
    assert_eq!(
        m[&series("ntp_system_stratum", &[])],
        system["stratum"].as_f64().unwrap()
    );
    assert_eq!(m[&series("ntp_system_synchronized", &[])], 1.0);
    assert_eq!(m[&series("ntp_system_leap_indicator", &[])], 0.0);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(m[&series("gnomon_build_info", &[("version", version)])], 1.0);

    if !have_tool(PROMTOOL) {
        eprintln!("SKIPPED: promtool check metrics (promtool is in Debian's `prometheus` package)");
    } else {
        let mut child = Command::new(PROMTOOL)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "promtool did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(g.stop().success());
}

//! A name server that never answers (issue 11 item 11), with the real binary: `gnomon serve`
//! runs in a private mount namespace whose /etc/resolv.conf points at a loopback UDP socket that
//! reads queries and never replies (glibc then takes 6 s per lookup: timeout 2 s, 3 attempts).
//! One upstream has a name only that server could resolve, the other is a local fake stratum-1
//! server by address. Clients get their first reply at once, the real upstream is polled every
//! second without a gap, across the first lookup and its retry a minute later, and
//! `gnomon sources --why` says the lookup is in progress, then that it failed.

mod common;
use common::*;
use std::net::UdpSocket;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Not in /etc/hosts, and under a reserved name no real server knows.
const NAME: &str = "gnomon-test.unresolvable.example";
/// Long enough to see the first lookup fail (6 s after start) and its retry (60 s later) be
/// under way, with seconds to spare either side.
const RUN: Duration = Duration::from_secs(70);

/// The black-hole name server: the first free 127.0.0.X:53, counting queries, never answering.
fn black_hole(stop: Arc<AtomicBool>) -> Option<(std::net::Ipv4Addr, Arc<AtomicUsize>, std::thread::JoinHandle<()>)> {
    let sock = (153..=172u8).find_map(|x| UdpSocket::bind(("127.0.0.".to_string() + &x.to_string(), 53)).ok())?;
    sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let ip = match sock.local_addr().unwrap().ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(_) => unreachable!(),
    };
    let queries = Arc::new(AtomicUsize::new(0));
    let q = queries.clone();
    let h = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if sock.recv_from(&mut buf).is_ok() {
                q.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    Some((ip, queries, h))
}

/// Why this machine cannot run the test, if it cannot.
fn cannot_run() -> Option<String> {
    if !is_root() {
        return Some("not root: binding port 53 and mount namespaces need it".into());
    }
    if !have_tool("/usr/bin/unshare") {
        return Some("no unshare".into());
    }
    let ok = Command::new("/usr/bin/unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Some("`unshare -m` is not permitted here".into());
    }
    // The name must reach DNS: a hosts line without `dns` (or with a caching or resolved module
    // first) would answer or fail without asking our server.
    let nss = std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
    let hosts = nss
        .lines()
        .find(|l| l.trim_start().starts_with("hosts:"))
        .unwrap_or("hosts: files dns");
    if !hosts.split_whitespace().any(|w| w == "dns") || hosts.contains("resolve") {
        return Some(format!(
            "/etc/nsswitch.conf `{hosts}` does not look names up by DNS directly"
        ));
    }
    if std::fs::read_to_string("/etc/hosts").unwrap_or_default().contains(NAME) {
        return Some(format!("{NAME} is in /etc/hosts"));
    }
    None
}

fn why_of(srv: &Gnomon) -> Option<String> {
    let out = srv.ctl(&["sources", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["sources"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == NAME)
        .and_then(|s| s["why"].as_str().map(str::to_string))
}

#[test]
fn a_name_server_that_never_answers_delays_no_reply_and_no_poll() {
    if let Some(why) = cannot_run() {
        skip(&why);
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let Some((ns, queries, ns_thread)) = black_hole(stop.clone()) else {
        skip("no free 127.0.0.X:53 for the test's name server");
        return;
    };
    let dir = tempdir("dns");
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {ns}\noptions timeout:2 attempts:3\n")).unwrap();

    // The real upstream, by address: a fake stratum-1 server that notes when each poll comes.
    let polls = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let p = polls.clone();
    let answer = fake_answer(0);
    let (port, upstream) = udp_server(stop.clone(), move |req| {
        p.lock().unwrap().push(Instant::now());
        answer(req)
    });
    let cfg = format!(
        "[[upstream]]\naddress = \"{NAME}\"\nminpoll = 0\nmaxpoll = 0\n\n\
         [[upstream]]\naddress = \"127.0.0.1\"\nport = {port}\nminpoll = 0\nmaxpoll = 0\n"
    );
    // `unshare -m` makes the namespace's mounts private, so the bind mount never leaves it.
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec \"$0\" \"$@\"",
        resolv.display()
    );
    let t0 = Instant::now();
    let srv = Gnomon::start_via(&["/usr/bin/unshare", "-m", "sh", "-c", &script], &cfg, &[]);

    // Clients: the first reply comes at once (it came after the 6 s lookup).
    let sock = client(srv.addr());
    let first_reply = loop {
        if exchange(&sock, srv.addr(), &request(4, 3, 1)).is_some() {
            break t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "no reply to a client in 15 s");
    };
    // The lookup shows while it runs.
    let (early, early_at) = loop {
        let w = why_of(&srv).unwrap_or_default();
        if w.starts_with("DNS lookup in progress") || t0.elapsed() > Duration::from_secs(4) {
            break (w, t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    // Then it fails, and says so; meanwhile the served time synchronises on the real upstream.
    let mut failed_at = None;
    let mut synced_at = None;
    while t0.elapsed() < RUN {
        if failed_at.is_none() && why_of(&srv).is_some_and(|w| w.contains("DNS failure")) {
            failed_at = Some(t0.elapsed());
        }
        if synced_at.is_none() && exchange(&sock, srv.addr(), &request(4, 3, 2)).is_some_and(|r| r[0] >> 6 != 3) {
            synced_at = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let late = why_of(&srv);
    let status = String::from_utf8_lossy(&srv.ctl(&["status"]).stdout).to_string();
    let times = polls.lock().unwrap().clone();
    let first_poll = times.first().map(|t| t.duration_since(t0));
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let max_gap = gaps.iter().max().copied().unwrap_or(RUN);
    let log: Vec<String> = srv.log.try_iter().collect();
    eprintln!(
        "first reply {first_reply:?}, first poll {first_poll:?}, {} polls, max gap {max_gap:?}, \
         synced at {synced_at:?}, failure shown at {failed_at:?}, {} DNS queries",
        times.len(),
        queries.load(Ordering::Relaxed)
    );
    stop.store(true, Ordering::Relaxed);
    upstream.join().unwrap();
    ns_thread.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    let q = queries.load(Ordering::Relaxed);
    assert!(
        q >= 2,
        "gnomon's lookups never reached the test's name server ({q} queries)"
    );
    assert!(
        first_reply < Duration::from_millis(1500),
        "first reply to a client {first_reply:?} after start"
    );
    assert!(
        first_poll.is_some_and(|t| t < Duration::from_millis(1500)),
        "first poll of the real upstream {first_poll:?} after start"
    );
    assert!(
        max_gap < Duration::from_secs(3),
        "polls of the real upstream (1 s apart) stalled for {max_gap:?}"
    );
    assert!(
        times.len() as u64 >= RUN.as_secs() * 3 / 4,
        "{} polls in {RUN:?}",
        times.len()
    );
    assert!(
        synced_at.is_some_and(|t| t < Duration::from_secs(15)),
        "served time synchronised at {synced_at:?}"
    );
    assert!(
        early.starts_with("DNS lookup in progress"),
        "sources --why at {early_at:?}: {early}"
    );
    assert!(
        failed_at.is_some_and(|t| t < Duration::from_secs(20)),
        "the failure showed at {failed_at:?}"
    );
    // A minute after the failure the name is asked again, still without a gap in polling.
    let late = late.unwrap_or_default();
    assert!(
        late.starts_with("DNS lookup in progress") && late.contains("DNS failure"),
        "sources --why at the end: {late}"
    );
    assert!(q >= 7, "the name was not looked up again ({q} queries)");
    // Stray datagrams at the sync socket are part of the status (none here).
    assert!(status.contains("Stray replies   : 0 (unknown source 0"), "{status}");
    let logged = log.iter().filter(|l| l.contains("DNS lookup of")).count();
    assert_eq!(
        logged, 1,
        "one log line for a name that keeps failing the same way: {log:?}"
    );
}

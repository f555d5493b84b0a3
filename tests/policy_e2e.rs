//! Access rules and rate limiting end to end, with many 127.x.y.z sources against one server:
//! serve, deny (KoD DENY), ignore, limited (an abuser gets about its limit plus the leak while
//! polite clients lose nothing), exempt, and reload while requests keep coming.

mod common;
use common::*;
use gnomon::proto::{Header, RefId};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

const RULES: &str = r#"
[[restrict]]
address = "default"
action = "limited"

[[restrict]]
address = "127.0.5.0 mask 255.255.255.0"
action = "deny"

[[restrict]]
address = "127.0.6.0/24"
action = "ignore"

[[restrict]]
address = "127.0.8.9"
action = "exempt"

[[restrict]]
address = "127.0.4.0/24"
action = "serve"

[rate_limit]
interval = 0.1
burst = 2
leak = 10
"#;

#[test]
fn serve_deny_ignore() {
    let srv = Gnomon::start(&format!("listen = [\"0.0.0.0:0\"]\nlocal_stratum = 2\n{RULES}"));
    let target: SocketAddr = format!("127.0.0.1:{}", srv.addr().port()).parse().unwrap();
    // serve
    let r = exchange(&from("127.0.4.1"), target, &request(4, 3, 1)).expect("served");
    assert_eq!(Header::decode(&r).unwrap().stratum, 2);
    // deny: KoD DENY, origin copied, no more bytes than asked
    let r = exchange(&from("127.0.5.77"), target, &request(4, 3, 42)).expect("KoD");
    let h = Header::decode(&r).unwrap();
    assert_eq!(h.kiss_code(), Some(RefId::DENY));
    assert_eq!(h.origin_timestamp.0, 42);
    assert_eq!(r.len(), 48);
    // ignore: nothing
    assert!(exchange(&from("127.0.6.3"), target, &request(4, 3, 1)).is_none());
    srv.wait_counter("drop_ignored", 1);
    let s = srv.stats();
    let c = &s["total"]["counters"];
    assert_eq!(c["kod_deny"].as_u64(), Some(1));
    assert_eq!(c["drop_ignored"].as_u64(), Some(1));
    assert_eq!(c["rule_serve"].as_u64(), Some(1));
    assert_eq!(c["rule_deny"].as_u64(), Some(1));
    assert_eq!(c["rule_ignore"].as_u64(), Some(1));
}

#[test]
fn abuser_gets_its_limit_polite_clients_lose_nothing_exempt_unlimited() {
    let srv = Gnomon::start(&format!(
        "listen = [\"0.0.0.0:0\"]\nworkers = 2\nlocal_stratum = 2\n{RULES}"
    ));
    let target: SocketAddr = format!("127.0.0.1:{}", srv.addr().port()).parse().unwrap();
    // Limit: 10/s with a burst of 2. The abuser sends 100/s (10x) for 3 s; three polite clients
    // send 4/s; an exempt client sends 100/s.
    let abuser = std::thread::spawn(move || send_paced("127.0.7.66", target, 300, 100.0));
    let exempt = std::thread::spawn(move || send_paced("127.0.8.9", target, 300, 100.0));
    let polite: Vec<_> = (1..=3)
        .map(|i| std::thread::spawn(move || send_paced(&format!("127.0.7.{i}"), target, 12, 4.0)))
        .collect();
    let (abuser_ok, abuser_kod) = abuser.join().unwrap();
    for p in polite {
        let (ok, kod) = p.join().unwrap();
        assert_eq!((ok, kod.len()), (12, 0), "a polite client lost replies");
    }
    let (exempt_ok, exempt_kod) = exempt.join().unwrap();
    assert_eq!((exempt_ok, exempt_kod.len()), (300, 0), "the exempt client was limited");
    // Allowed: about 3 s x 10/s + burst = 32; leak: 1 in 10 of the ~268 over the limit = ~27.
    assert!(abuser_kod.is_empty(), "KoD RATE is off by default");
    assert!(
        (40..=80).contains(&abuser_ok),
        "abuser got {abuser_ok} of 300 (expected about 59)"
    );
    srv.wait_counter("received", 300 + 300 + 36);
    let c = srv.stats()["total"]["counters"].clone();
    let dropped = c["drop_rate_limited"].as_u64().unwrap();
    let leaked = c["rate_leaked"].as_u64().unwrap();
    assert_eq!(dropped + abuser_ok as u64, 300, "{c}");
    assert!((10..=50).contains(&leaked), "leaked {leaked}");
    assert_eq!(c["rule_exempt"].as_u64(), Some(300));
}

#[test]
fn kod_rate_when_configured_and_itself_limited() {
    let srv = Gnomon::start(
        "local_stratum = 2\n[[restrict]]\naddress = \"default\"\naction = \"limited\"\n[rate_limit]\ninterval = 1.0\nburst = 1\nleak = 0\nkod = true\n",
    );
    let target = srv.addr();
    let (ok, kods) = send_paced("127.0.7.99", target, 100, 200.0);
    assert!(ok <= 2, "{ok} answered in 0.5 s at 1/s");
    assert!(!kods.is_empty() && kods.iter().all(|k| *k == RefId::RATE), "{kods:?}");
    // The KoDs themselves are limited: far fewer than the 98 or so dropped requests.
    assert!(kods.len() <= 10, "{} KoD RATE replies", kods.len());
}

#[test]
fn reload_changes_the_outcome_without_dropping_a_request() {
    let srv = Gnomon::start(&format!("local_stratum = 2\n{RULES}"));
    let target = srv.addr();
    let cfg_path = srv.dir.join("gnomon.toml");
    let s = from("127.0.5.10");
    // Before: DENY.
    let h = Header::decode(&exchange(&s, target, &request(4, 3, 1)).unwrap()).unwrap();
    assert_eq!(h.kiss_code(), Some(RefId::DENY));
    // Keep asking (every request must be answered, before, during and after) while reloading,
    // below the rate limit: DENY answers are rate limited too.
    let sender = std::thread::spawn(move || {
        let mut kinds = Vec::new();
        for i in 0..40u64 {
            let r = exchange(&s, target, &request(4, 3, i + 10)).expect("a request was dropped during reload");
            kinds.push(Header::decode(&r).unwrap().kiss_code());
            std::thread::sleep(Duration::from_millis(110));
        }
        kinds
    });
    std::thread::sleep(Duration::from_millis(1200));
    let text = std::fs::read_to_string(&cfg_path).unwrap().replace(
        "address = \"127.0.5.0 mask 255.255.255.0\"\naction = \"deny\"",
        "address = \"127.0.5.0 mask 255.255.255.0\"\naction = \"exempt\"",
    );
    std::fs::write(&cfg_path, text).unwrap();
    let out = srv.ctl(&["reload"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("reloaded"));
    let kinds = sender.join().unwrap();
    assert_eq!(kinds.len(), 40);
    let first_served = kinds.iter().position(|k| k.is_none()).expect("reload had no effect");
    assert!(kinds[..first_served].iter().all(|k| *k == Some(RefId::DENY)));
    assert!(
        kinds[first_served..].iter().all(|k| k.is_none()),
        "outcome flapped after reload"
    );
    // A broken file is refused and the running policy stays.
    std::fs::write(&cfg_path, "[[restrict]]\naddress = \"nonsense\"\naction = \"deny\"\n").unwrap();
    let out = srv.ctl(&["reload"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(":2: key `address`"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let s = from("127.0.5.11");
    assert!(
        Header::decode(&exchange(&s, target, &request(4, 3, 1)).unwrap())
            .unwrap()
            .kiss_code()
            .is_none()
    );
    // SIGHUP does the same as `gnomon reload`.
    std::fs::write(&cfg_path, std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let text = format!(
        "control_socket = \"{}\"\nlisten = [\"127.0.0.1:0\"]\nlocal_stratum = 2\n{RULES}",
        srv.control.display()
    );
    std::fs::write(&cfg_path, text).unwrap();
    let _ = Command::new("kill")
        .arg("-HUP")
        .arg(srv.child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let k = Header::decode(&exchange(&s, target, &request(4, 3, 1)).unwrap())
            .unwrap()
            .kiss_code();
        if k == Some(RefId::DENY) {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
}

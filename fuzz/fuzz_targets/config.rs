//! Fuzz target: arbitrary text as the config file. It is an error or a config, never a panic;
//! an error names the file and a line that exists, with a key written on it; an accepted
//! config is in range and parsing the same text again gives the same config.
#![no_main]

use gnomon::config::Config;
use gnomon::policy::AccessTable;
use gnomon::sync::{MAX_POLL, MIN_POLL};
use libfuzzer_sys::fuzz_target;

const FILE: &str = "fuzz.toml";

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, FILE) {
        Err(e) => {
            assert_eq!(e.file, FILE);
            let lines = text.split('\n').count();
            assert!(
                e.line.is_none_or(|l| (1..=lines).contains(&l)),
                "{e} (of {lines} lines)"
            );
            if let (Some(k), Some(_)) = (&e.key, e.line) {
                assert!(text.contains(k.as_str()), "{e}");
            }
            assert!(e.to_string().starts_with(FILE));
        }
        Ok(c) => {
            let again = Config::parse(&text, FILE).expect("the same text parses twice");
            assert_eq!(format!("{c:?}"), format!("{again:?}"));
            assert!(!c.serve.listen.is_empty());
            assert!(c.serve.workers <= 1024);
            assert!(c.sync.local_stratum.is_none_or(|s| (1..=15).contains(&s)));
            let d = c.sync.max_root_dispersion;
            assert!(d.is_finite() && (0.001..=16.0).contains(&d));
            for u in &c.sync.upstreams {
                assert!(
                    !u.address.is_empty() && !u.address.contains(char::is_whitespace),
                    "{u:?}"
                );
                assert!(u.port != 0);
                assert!(
                    MIN_POLL <= u.minpoll && u.minpoll <= u.maxpoll && u.maxpoll <= MAX_POLL,
                    "{u:?}"
                );
            }
            let rl = &c.policy.rate_limit;
            assert!(rl.interval.is_finite() && rl.interval > 0.0 && rl.burst >= 1, "{rl:?}");
            assert!(
                (1..=32).contains(&rl.ipv4_prefix) && (1..=128).contains(&rl.ipv6_prefix),
                "{rl:?}"
            );
            // The access rules build a table (the rate limiter's memory is not allocated here:
            // table_bytes may be gigabytes).
            let table = AccessTable::new(&c.policy.rules, c.policy.default);
            for r in &c.policy.rules {
                let _ = table.lookup(r.prefix.addr());
            }
        }
    }
});

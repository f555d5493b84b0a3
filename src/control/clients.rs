//! `gnomon clients`, like `chronyc clients`: the busiest clients by requests and by drops, from
//! the requests the workers sample (1 in [`SAMPLE_EVERY`]) into their rings. The control thread
//! drains the rings into a space-saving table (Metwally et al., 2005) of a fixed number of slots:
//! memory is set here whatever the number of clients, and a client sending more than 1 in
//! [`TABLE_SLOTS`] of the sampled requests is always in it.

use crate::server::stats::{Outcome, SAMPLE_EVERY, WorkerStats};
use std::collections::HashMap;
use std::fmt::Write;
use std::net::IpAddr;
use std::sync::Arc;

/// Clients the table tracks at once.
pub const TABLE_SLOTS: usize = 1024;

#[derive(Clone, Copy, Debug)]
struct Entry {
    ip: IpAddr,
    /// Samples counted for it, including the `error` inherited from the slot's previous owner.
    requests: u64,
    answered: u64,
    dropped: u64,
    kod: u64,
    /// Space-saving's overestimate bound: `requests` may be this much too high.
    error: u64,
    last: Outcome,
}

/// The bounded top-N table, fed from the workers' sample rings.
pub struct ClientTable {
    entries: Vec<Entry>,
    index: HashMap<IpAddr, usize>,
    /// Per worker, the next sample number to read from its ring.
    next: Vec<u64>,
    samples: u64,
    lost: u64,
}

impl ClientTable {
    pub fn new(workers: usize) -> ClientTable {
        ClientTable {
            entries: Vec::with_capacity(TABLE_SLOTS),
            index: HashMap::with_capacity(TABLE_SLOTS),
            next: vec![0; workers],
            samples: 0,
            lost: 0,
        }
    }

    /// Takes what the workers sampled since the last call.
    pub fn drain(&mut self, stats: &[Arc<WorkerStats>]) {
        for (i, s) in stats.iter().enumerate() {
            let mut next = self.next[i];
            let mut got = Vec::new();
            self.lost += s.samples.drain(&mut next, |ip, o| got.push((ip, o)));
            self.next[i] = next;
            for (ip, o) in got {
                self.add(ip, o);
            }
        }
    }

    /// One sample: its client's counts go up; a new client with the table full takes the slot
    /// of the least counted one, inheriting its count as the error bound.
    pub fn add(&mut self, ip: IpAddr, outcome: Outcome) {
        self.samples += 1;
        let i = match self.index.get(&ip) {
            Some(&i) => i,
            None if self.entries.len() < TABLE_SLOTS => {
                self.entries.push(Entry {
                    ip,
                    requests: 0,
                    answered: 0,
                    dropped: 0,
                    kod: 0,
                    error: 0,
                    last: outcome,
                });
                self.index.insert(ip, self.entries.len() - 1);
                self.entries.len() - 1
            }
            None => {
                let (i, min) = self
                    .entries
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, e)| e.requests)
                    .map(|(i, e)| (i, e.requests))
                    .expect("a full table");
                self.index.remove(&self.entries[i].ip);
                self.entries[i] = Entry {
                    ip,
                    requests: min,
                    answered: 0,
                    dropped: 0,
                    kod: 0,
                    error: min,
                    last: outcome,
                };
                self.index.insert(ip, i);
                i
            }
        };
        let e = &mut self.entries[i];
        e.requests += 1;
        e.last = outcome;
        match outcome {
            Outcome::Answered => e.answered += 1,
            Outcome::KodDeny | Outcome::KodRate => e.kod += 1,
            o if o.is_drop() => e.dropped += 1,
            _ => {}
        }
    }

    /// The `top` clients by requests and by drops, counts scaled up by the sampling rate.
    pub fn render(&self, top: usize) -> String {
        let k = u64::from(SAMPLE_EVERY);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "sampled 1 in {k} requests: counts are samples x {k}, estimates ({} samples, {} clients tracked of at most {TABLE_SLOTS}, {} samples lost to overwriting)",
            self.samples,
            self.entries.len(),
            self.lost
        );
        let mut by: Vec<&Entry> = self.entries.iter().collect();
        for (title, key) in [
            ("requests", (|e: &Entry| e.requests) as fn(&Entry) -> u64),
            ("drops", |e: &Entry| e.dropped),
        ] {
            by.sort_by_key(|e| (std::cmp::Reverse(key(e)), e.ip));
            let _ = writeln!(out, "\ntop {top} by {title}:");
            let _ = writeln!(
                out,
                "{:<40} {:>10} {:>10} {:>10} {:>8} {:>8}  last",
                "address", "requests", "answered", "dropped", "kod", "+-"
            );
            let mut shown = 0;
            for e in by.iter().filter(|e| key(e) > 0).take(top) {
                shown += 1;
                let _ = writeln!(
                    out,
                    "{:<40} {:>10} {:>10} {:>10} {:>8} {:>8}  {}",
                    e.ip.to_string(),
                    e.requests * k,
                    e.answered * k,
                    e.dropped * k,
                    e.kod * k,
                    e.error * k,
                    e.last.name()
                );
            }
            if shown == 0 {
                let _ = writeln!(out, "(none sampled yet)");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn heavy_clients_survive_a_flood_of_one_off_addresses() {
        let mut t = ClientTable::new(0);
        let heavy: IpAddr = "192.0.2.1".parse().unwrap();
        let dropper: IpAddr = "192.0.2.2".parse().unwrap();
        for i in 0..100_000u32 {
            t.add(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), Outcome::Answered);
            if i % 10 == 0 {
                t.add(heavy, Outcome::Answered);
            }
            if i % 20 == 0 {
                t.add(dropper, Outcome::RateLimited);
            }
        }
        assert_eq!(t.entries.len(), TABLE_SLOTS, "memory stays fixed");
        let text = t.render(3);
        let by_requests = text.split("top 3 by drops").next().unwrap();
        let first = by_requests.lines().nth(4).unwrap();
        assert!(first.starts_with("192.0.2.1 "), "{text}");
        let drops = text.split("top 3 by drops:").nth(1).unwrap();
        let first = drops.lines().nth(2).unwrap();
        assert!(first.starts_with("192.0.2.2 "), "{text}");
        assert!(first.ends_with("rate_limited"), "{first}");
    }
}

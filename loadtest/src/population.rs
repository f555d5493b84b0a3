//! Who sends: the client population (N addresses in 127.1.0.0 upwards, picked round-robin or
//! from a Zipf distribution) and named abusers, each paced at its own rate. Pure.

use std::net::Ipv4Addr;

/// Clients live from 127.1.0.0 up, so they never collide with 127.0.0.1 (the usual server) or
/// with abusers the user names in 127.9.x.x and above when there are fewer than 8 * 2^16.
pub const FIRST_CLIENT: u32 = u32::from_be_bytes([127, 1, 0, 0]);
/// 127.1.0.0 .. 127.255.255.254.
pub const MAX_CLIENTS: u32 = u32::from_be_bytes([127, 255, 255, 254]) - FIRST_CLIENT;

pub fn client_addr(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(FIRST_CLIENT + index)
}

/// xorshift64*: small and fast; quality is ample for picking clients.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// How the population's requests are spread over its clients.
#[derive(Clone, Debug)]
pub enum Picker {
    /// Every client in turn: exactly uniform.
    RoundRobin { clients: u32, next: u32 },
    /// Client k (0-based) with weight 1/(k+1)^s: a few heavy clients and a long tail.
    Zipf { cdf: Vec<f64>, rng: Rng },
}

impl Picker {
    pub fn uniform(clients: u32) -> Picker {
        Picker::RoundRobin {
            clients: clients.max(1),
            next: 0,
        }
    }

    pub fn zipf(clients: u32, s: f64, seed: u64) -> Picker {
        let mut cdf = Vec::with_capacity(clients.max(1) as usize);
        let mut total = 0.0;
        for k in 0..clients.max(1) {
            total += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Picker::Zipf {
            cdf,
            rng: Rng::new(seed),
        }
    }

    #[inline]
    pub fn pick(&mut self) -> u32 {
        match self {
            Picker::RoundRobin { clients, next } => {
                let c = *next;
                *next = if c + 1 >= *clients { 0 } else { c + 1 };
                c
            }
            Picker::Zipf { cdf, rng } => {
                let u = rng.next_f64();
                (cdf.partition_point(|&c| c <= u) as u32).min(cdf.len() as u32 - 1)
            }
        }
    }
}

/// Open-loop pacing of one stream: how many packets are owed at time t. A stream that falls
/// more than `max_backlog` behind drops the excess from its schedule instead of bursting
/// forever, and counts it, so an overloaded generator shows up as a low achieved send rate.
#[derive(Clone, Debug)]
pub struct Pacer {
    /// Packets per second; `None` = as fast as possible.
    pub rate: Option<f64>,
    pub emitted: u64,
    pub skipped: u64,
    pub max_backlog: u64,
}

impl Pacer {
    pub fn new(rate: Option<f64>, max_backlog: u64) -> Pacer {
        Pacer {
            rate,
            emitted: 0,
            skipped: 0,
            max_backlog,
        }
    }

    /// Packets due now, `elapsed_ns` after the stream started; `u64::MAX` when unpaced.
    pub fn due(&mut self, elapsed_ns: u64) -> u64 {
        let Some(rate) = self.rate else {
            return u64::MAX;
        };
        let target = (rate * elapsed_ns as f64 * 1e-9) as u64;
        let owed = target.saturating_sub(self.emitted + self.skipped);
        if owed > self.max_backlog {
            self.skipped += owed - self.max_backlog;
            return self.max_backlog;
        }
        owed
    }

    /// Nanoseconds after the start at which `n` more packets will be due.
    pub fn when_due(&self, n: u64) -> u64 {
        match self.rate {
            Some(r) if r > 0.0 => (((self.emitted + self.skipped + n) as f64 / r) * 1e9).ceil() as u64,
            Some(_) => u64::MAX,
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses() {
        assert_eq!(client_addr(0), Ipv4Addr::new(127, 1, 0, 0));
        assert_eq!(client_addr(65536 + 258), Ipv4Addr::new(127, 2, 1, 2));
        assert_eq!(client_addr(MAX_CLIENTS), Ipv4Addr::new(127, 255, 255, 254));
    }

    #[test]
    fn round_robin_is_exactly_uniform() {
        let mut p = Picker::uniform(3);
        let picks: Vec<u32> = (0..7).map(|_| p.pick()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn zipf_is_heavy_at_the_head() {
        let mut p = Picker::zipf(1000, 1.1, 42);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            counts[p.pick() as usize] += 1;
        }
        // Weight of client 0 is 1/H(1000, 1.1), about 17%; client 999 gets about 0.0008%.
        assert!(counts[0] > 14_000 && counts[0] < 20_000, "{}", counts[0]);
        assert!(counts[0] > 2 * counts[1]);
        assert!(counts[999] < 20);
    }

    #[test]
    fn pacer_owes_rate_times_time_and_caps_backlog() {
        let mut p = Pacer::new(Some(1000.0), 50);
        assert_eq!(p.due(10_000_000), 10);
        p.emitted += 10;
        assert_eq!(p.due(10_000_000), 0);
        assert_eq!(p.when_due(1), 11_000_000);
        // One second later 990 are owed; only 50 may be sent, the rest are skipped.
        assert_eq!(p.due(1_000_000_000), 50);
        assert_eq!(p.skipped, 940);
        assert_eq!(Pacer::new(None, 1).due(5), u64::MAX);
    }
}

//! An independent check of our counts: the kernel's UDP counters in /proc/net/snmp over the
//! same window. On loopback both ends are on this host, so each datagram is counted twice:
//! OutDatagrams = our requests + the server's replies, and InDatagrams (counted when an
//! application reads) = what the server read + the replies we read.

use serde::Serialize;
use std::fmt::Write;

/// The Udp counters we use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UdpCounters {
    pub in_datagrams: u64,
    pub no_ports: u64,
    pub in_errors: u64,
    pub out_datagrams: u64,
    pub rcvbuf_errors: u64,
    pub sndbuf_errors: u64,
}

/// Parses the two `Udp:` lines (names, then values) of /proc/net/snmp.
pub fn parse_udp(text: &str) -> Option<UdpCounters> {
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().skip(1).collect();
    let values: Vec<u64> = lines
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let get = |n: &str| names.iter().position(|x| *x == n).and_then(|i| values.get(i).copied());
    Some(UdpCounters {
        in_datagrams: get("InDatagrams")?,
        no_ports: get("NoPorts")?,
        in_errors: get("InErrors")?,
        out_datagrams: get("OutDatagrams")?,
        rcvbuf_errors: get("RcvbufErrors").unwrap_or(0),
        sndbuf_errors: get("SndbufErrors").unwrap_or(0),
    })
}

pub fn read_udp() -> Option<UdpCounters> {
    parse_udp(&std::fs::read_to_string("/proc/net/snmp").ok()?)
}

/// Kernel deltas beside what our counts predict for them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct SnmpCheck {
    pub kernel: UdpCounters,
    /// sent + replies: our requests plus the replies the server sent that reached us.
    pub expected_out: u64,
    /// 2 * replies: assumes the server read every request it answered and nothing more.
    pub expected_in: u64,
    /// kernel / expected, for OutDatagrams and InDatagrams.
    pub out_ratio: f64,
    pub in_ratio: f64,
    /// Both ratios within 15 %.
    pub agrees: bool,
}

impl SnmpCheck {
    pub fn new(before: UdpCounters, after: UdpCounters, sent: u64, replies: u64) -> SnmpCheck {
        let d = |a: u64, b: u64| a.wrapping_sub(b);
        let kernel = UdpCounters {
            in_datagrams: d(after.in_datagrams, before.in_datagrams),
            no_ports: d(after.no_ports, before.no_ports),
            in_errors: d(after.in_errors, before.in_errors),
            out_datagrams: d(after.out_datagrams, before.out_datagrams),
            rcvbuf_errors: d(after.rcvbuf_errors, before.rcvbuf_errors),
            sndbuf_errors: d(after.sndbuf_errors, before.sndbuf_errors),
        };
        let expected_out = sent + replies;
        let expected_in = 2 * replies;
        let ratio = |k: u64, e: u64| if e == 0 { f64::NAN } else { k as f64 / e as f64 };
        let out_ratio = ratio(kernel.out_datagrams, expected_out);
        let in_ratio = ratio(kernel.in_datagrams, expected_in);
        let ok = |r: f64| (r - 1.0).abs() <= 0.15;
        SnmpCheck {
            kernel,
            expected_out,
            expected_in,
            out_ratio,
            in_ratio,
            agrees: ok(out_ratio) && ok(in_ratio),
        }
    }

    pub fn human(&self) -> String {
        let k = &self.kernel;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "  /proc/net/snmp Udp deltas: OutDatagrams {} (ours: sent+replies {}, ratio {:.4}), InDatagrams {} (ours: 2*replies {}, ratio {:.4})",
            k.out_datagrams, self.expected_out, self.out_ratio, k.in_datagrams, self.expected_in, self.in_ratio
        );
        let _ = writeln!(
            s,
            "                             InErrors {}, RcvbufErrors {}, SndbufErrors {}, NoPorts {} -> {}",
            k.in_errors,
            k.rcvbuf_errors,
            k.sndbuf_errors,
            k.no_ports,
            if self.agrees {
                "agree within 15%"
            } else {
                "DISAGREE (>15%; other UDP traffic on this host also counts)"
            }
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n\
Udp: 100 2 3 150 4 5 0 0 0\n\
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n\
UdpLite: 0 0 0 0 0 0 0 0 0\n";

    #[test]
    fn parses_udp_not_udplite() {
        let c = parse_udp(SAMPLE).unwrap();
        assert_eq!(
            c,
            UdpCounters {
                in_datagrams: 100,
                no_ports: 2,
                in_errors: 3,
                out_datagrams: 150,
                rcvbuf_errors: 4,
                sndbuf_errors: 5
            }
        );
        assert_eq!(parse_udp("Ip: a\nIp: 1\n"), None);
    }

    #[test]
    fn check_compares_deltas() {
        let before = parse_udp(SAMPLE).unwrap();
        let mut after = before;
        after.out_datagrams += 2000;
        after.in_datagrams += 1900;
        let c = SnmpCheck::new(before, after, 1000, 1000);
        assert_eq!(c.kernel.out_datagrams, 2000);
        assert!((c.in_ratio - 0.95).abs() < 1e-9);
        assert!(c.agrees);
        let c = SnmpCheck::new(before, after, 1000, 500);
        assert!(!c.agrees);
    }
}

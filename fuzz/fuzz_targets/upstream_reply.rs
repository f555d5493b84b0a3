//! Fuzz target: arbitrary datagrams as upstream replies to the sync core, between polls on
//! virtual time. A datagram that does not carry the origin of the request in flight changes
//! nothing but the mismatch counter; whatever comes, the published state and the report stay
//! finite and in range.
#![no_main]

use gnomon::clock::PHI;
use gnomon::proto::{HEADER_LEN, NtpTimestamp};
use gnomon::sync::discipline::MAX_TOTAL_FREQUENCY;
use gnomon::sync::{SyncConfig, SyncCore, UpstreamConfig};
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;

const NS: i64 = 1_000_000_000;
const T0: i64 = 1_750_000_000 * NS;
const PRECISION: i8 = -20;
const MAX_ROUNDS: usize = 96;
/// Not one of the sources: its datagrams are stray.
const STRANGER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 99)), 123);

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1 + i as u8], 123))
}

/// Everything a reply may change in the core, but for the mismatch and stray counters.
fn snapshot(core: &SyncCore, now_ns: i64) -> String {
    let sources: Vec<_> = core
        .sources()
        .map(|s| {
            (
                s.reach,
                s.missed,
                s.poll,
                s.next_poll_at(),
                s.last_rejection,
                s.denied,
                s.rate_floor,
                s.last_reply_ns,
                s.filter.len(),
                s.filter.last().copied(),
            )
        })
        .collect();
    format!(
        "{:?} {:?} {:?} {sources:?}",
        core.state(),
        core.select_state(),
        core.next_deadline()
    ) + &format!(" {:?}", core.report(now_ns).system)
}

fn mismatched(core: &SyncCore) -> Vec<u64> {
    core.sources().map(|s| s.mismatched).collect()
}

fn check_sane(core: &SyncCore, now_ns: i64, render: bool) {
    let s = core.state();
    assert!(s.root_dispersion.is_finite() && s.root_dispersion >= 0.0, "{s:?}");
    assert!(s.root_delay.is_finite() && s.root_delay >= 0.0, "{s:?}");
    assert!(s.dispersion_rate.is_finite() && s.dispersion_rate >= PHI, "{s:?}");
    assert!(s.frequency.abs() <= MAX_TOTAL_FREQUENCY * (1.0 + 1e-9), "{s:?}");
    assert!((1..=16).contains(&s.stratum), "{s:?}");
    let d = s.root_dispersion_at(now_ns);
    assert!(d.is_finite() && d >= 0.0, "{d}");
    let _ = s.server_info(now_ns);
    let r = core.report(now_ns);
    let sys = &r.system;
    for x in [
        sys.offset_s,
        sys.correction_s,
        sys.frequency_ppm,
        sys.root_delay_s,
        sys.root_dispersion_s,
    ] {
        assert!(x.is_finite(), "{sys:?}");
    }
    assert!(sys.root_dispersion_s >= 0.0, "{sys:?}");
    for src in &r.sources {
        for x in [src.delay_ms, src.offset_ms, src.jitter_ms].into_iter().flatten() {
            assert!(x.is_finite(), "{src:?}");
        }
        assert!(
            src.delay_ms.is_none_or(|x| x > 0.0) && src.jitter_ms.is_none_or(|x| x > 0.0),
            "{src:?}"
        );
    }
    if render {
        let _ = gnomon::sync::render_sources(&r, true);
        let _ = gnomon::sync::render_status(&r);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(setup) = input.byte() else { return };
    let n = 1 + usize::from(setup & 3) % 3;
    let mut cfg = UpstreamConfig::new("upstream");
    cfg.iburst = setup & 4 != 0;
    cfg.minpoll = ((setup >> 3) & 3) as i8;
    cfg.maxpoll = cfg.minpoll + ((setup >> 5) & 7) as i8;
    let mut core = SyncCore::new(&SyncConfig::default(), PRECISION, T0);
    for i in 0..n {
        core.add_source(&cfg, addr(i), T0);
    }
    let mut now = T0;
    // The transmit timestamp and send time of each source's last request.
    let mut sent: Vec<Option<([u8; 8], i64)>> = vec![None; n];
    let mut skew = vec![0i64; n];
    let mut counter = 0u64;
    let mut out = Vec::new();
    check_sane(&core, now, false);
    for _ in 0..MAX_ROUNDS {
        let Some(op) = input.byte() else { break };
        if op & 3 == 0 {
            // Time passes to the next deadline and up to 16 s more, then due requests go out.
            let step = i64::from(input.byte().unwrap_or(0)) * NS / 16;
            now = core.next_deadline().map_or(now, |d| d.max(now)) + step;
            if let Some(s) = core.tick(now) {
                assert_eq!(s, core.state());
            }
            out.clear();
            core.poll(
                now,
                &mut || {
                    counter += 1;
                    counter.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                },
                &mut out,
            );
            for (to, req) in &out {
                let i = (0..n).find(|&i| addr(i) == *to).expect("requests go to sources");
                sent[i] = Some((req[40..48].try_into().unwrap(), now));
            }
            check_sane(&core, now, false);
            continue;
        }
        let target = usize::from(op >> 2) % (n + 1);
        let from = if target == n { STRANGER } else { addr(target) };
        let len = usize::from(input.byte().unwrap_or(0));
        let mut reply = input.take(len).to_vec();
        let known = sent.get(target).copied().flatten();
        if op & 0x40 != 0 {
            // A well-formed reply (mode 4, version 4, a stratum, root delay and dispersion
            // under half a second) with timestamps near the send time, or off by up to a
            // century, so the fuzzer reaches filtering, selection and the discipline quickly.
            reply.resize(reply.len().max(HEADER_LEN), 0);
            reply[0] = (reply[0] & 0xc0) | (4 << 3) | 4;
            reply[1] = 1 + reply[1] % 15;
            for i in [4, 8] {
                reply[i] = 0;
                reply[i + 1] &= 0x7f;
            }
            let t1 = known.map_or(now, |k| k.1);
            // A server keeps its error from one reply to the next unless the input changes it.
            if reply[17] & 1 != 0 {
                skew[target.min(n - 1)] =
                    (i64::from(i16::from_be_bytes([reply[2], reply[3]])) * 100_000) << (reply[16] % 31);
            }
            let skew = skew[target.min(n - 1)];
            let t2 = NtpTimestamp::from_unix_nanos((t1 + skew + 1_000_000).into());
            let t3 = NtpTimestamp::from_unix_nanos((t1 + skew + 1_100_000).into());
            reply[32..40].copy_from_slice(&t2.0.to_be_bytes());
            reply[40..48].copy_from_slice(&t3.0.to_be_bytes());
        }
        if op & 0x80 != 0
            && let Some((tx, _)) = known
            && reply.len() >= 32
        {
            reply[24..32].copy_from_slice(&tx);
        }
        // Replies come after their request, within a quarter of a second here.
        now += i64::from(input.byte().unwrap_or(0)) * NS / 1024;
        let authentic = target < n && reply.len() >= HEADER_LEN && known.is_some_and(|(tx, _)| reply[24..32] == tx);
        let before = (!authentic).then(|| snapshot(&core, now));
        let (mismatched_before, stray_before) = (mismatched(&core), core.stray().total());
        let published = core.handle_reply(from, &reply, now);
        check_sane(&core, now, false);
        if let Some(s) = published {
            assert_eq!(s, core.state());
        }
        if let Some(before) = before {
            // Spoofed, stray or truncated: no trace but a counter.
            assert!(published.is_none());
            assert_eq!(
                before,
                snapshot(&core, now),
                "a reply without our origin changed the state"
            );
            // Every such datagram is a stray of the core; one from a source's address that is
            // long enough to be read is also a mismatch of that source.
            assert_eq!(core.stray().total(), stray_before + 1);
            let mut expected = mismatched_before;
            if reply.len() >= HEADER_LEN
                && let Some(m) = expected.get_mut(target)
            {
                *m += 1;
            }
            assert_eq!(mismatched(&core), expected);
        }
    }
    check_sane(&core, now, true);
});

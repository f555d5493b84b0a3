//! The NTP handler: request checks, policy, and the reply stamped from the clock snapshot.

use super::socket::{SendError, peer_ip};
use super::stats::{Counter, LocalStats, Outcome, SAMPLE_EVERY, WorkerStats};
use super::{Datagram, Handler, TxStamp};
use crate::clock::{ClockReader, ClockState, realtime_ns};
use crate::nts::ntp::{NtsServer, ReplyHeader, Verdict};
use crate::nts::server::SharedKeys;
use crate::policy::{Action, Limit, PolicySet, SharedPolicy};
use crate::proto::{RefId, ReplyTemplate, check_addresses, check_request, stamp_transmit, write_reply};
use std::net::IpAddr;
use std::sync::Arc;

/// One worker's NTP handler. Everything it needs per batch is read once in `begin_batch`.
pub struct NtpHandler {
    clock: ClockReader,
    state: ClockState,
    template: ReplyTemplate,
    kod_deny: ReplyTemplate,
    kod_rate: ReplyTemplate,
    batch_realtime_ns: i64,
    shared_policy: Arc<SharedPolicy>,
    policy: Arc<PolicySet>,
    policy_generation: u64,
    /// xorshift64 state for the rate limiter's leak.
    rng: u64,
    /// Requests until the next one is sampled for `gnomon clients`.
    sample_left: u32,
    local: LocalStats,
    shared: Arc<WorkerStats>,
    /// With `[nts]`: this worker's NTS state and the published master keys.
    nts: Option<(NtsServer, Arc<SharedKeys>, u64)>,
}

impl NtpHandler {
    pub fn new(clock: ClockReader, policy: Arc<SharedPolicy>, shared: Arc<WorkerStats>) -> NtpHandler {
        let state = clock.load();
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        NtpHandler {
            template: ReplyTemplate::new(&state.server_info(0)),
            kod_deny: ReplyTemplate::kiss(RefId::DENY),
            kod_rate: ReplyTemplate::kiss(RefId::RATE),
            clock,
            state,
            batch_realtime_ns: 0,
            policy_generation: policy.generation(),
            policy: policy.load(),
            shared_policy: policy,
            rng: u64::from_le_bytes(seed) | 1,
            sample_left: SAMPLE_EVERY,
            local: LocalStats::default(),
            shared,
            nts: None,
        }
    }

    /// Serves NTS requests too, with the master keys `keys` publishes.
    pub fn with_nts(mut self, keys: Arc<SharedKeys>) -> NtpHandler {
        let mut seed = [0u8; 32];
        let _ = getrandom::fill(&mut seed);
        self.nts = Some((NtsServer::new(&keys.load(), seed), keys.clone(), keys.generation()));
        self
    }

    #[inline]
    fn random(&mut self) -> u32 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 32) as u32
    }

    /// The rate limiter's verdict for `ip`, with what it says counted.
    #[inline]
    fn rate_limit(&mut self, ip: IpAddr, rx: i64) -> Limit {
        let random = self.random();
        let checked = self.policy.limiter.check_detail(ip, rx as u64, random);
        if checked.evicted {
            self.local.add(Counter::RateEvicted, 1);
        }
        match checked.limit {
            Limit::Leak => self.local.add(Counter::Leaked, 1),
            Limit::Drop => self.local.add(Counter::RateLimited, 1),
            Limit::Allow | Limit::Kod => {}
        }
        checked.limit
    }

    /// Everything about one request but the sampling; the reply's length and what became of it.
    #[inline(always)]
    fn answer(&mut self, d: Datagram<'_>) -> (usize, Outcome) {
        if !self.local.received(d.truncated) {
            return (0, Outcome::Invalid);
        }
        if let Err(e) = check_request(&d.buf[..d.len]) {
            self.local.add(Counter::from_request_error(e), 1);
            return (0, Outcome::Invalid);
        }
        // Before any policy: a reply that cannot reach the client is never built, and an address
        // spelled to look like another (::ffff:127.0.0.1) never meets a rule.
        if let Err(u) = check_addresses(d.peer, d.destination) {
            self.local.add(Counter::from_unanswerable(u), 1);
            return (0, Outcome::Invalid);
        }
        let rx = match d.rx_realtime_ns {
            Some(t) => t,
            None => {
                self.local.add(Counter::NoTimestamp, 1);
                self.batch_realtime_ns
            }
        };
        let ip = peer_ip(&d.peer);
        let action = self.policy.access.action(ip);
        self.local.add(Counter::from_action(action), 1);
        let template = match action {
            Action::Serve | Action::Exempt => (&self.template, Outcome::Answered),
            Action::Ignore => {
                self.local.add(Counter::Ignored, 1);
                return (0, Outcome::Ignored);
            }
            // A refused client's answer is limited like any other, or a spoofed flood would
            // turn the server into a 1:1 reflector of DENYs at line rate.
            Action::Deny => match self.rate_limit(ip, rx) {
                Limit::Drop => return (0, Outcome::RateLimited),
                Limit::Allow | Limit::Leak | Limit::Kod => {
                    self.local.add(Counter::KodDeny, 1);
                    (&self.kod_deny, Outcome::KodDeny)
                }
            },
            Action::Limited => match self.rate_limit(ip, rx) {
                Limit::Allow | Limit::Leak => (&self.template, Outcome::Answered),
                Limit::Drop => return (0, Outcome::RateLimited),
                // The limiter sends at most one per client per KoD window: limited too.
                Limit::Kod => {
                    self.local.add(Counter::KodRate, 1);
                    (&self.kod_rate, Outcome::KodRate)
                }
            },
            Action::NtsOnly => {
                // A 48-byte request has no room for NTS: dropped before it costs a limiter slot.
                if d.len <= crate::proto::HEADER_LEN || self.nts.is_none() {
                    self.local.add(Counter::NotNts, 1);
                    return (0, Outcome::Ignored);
                }
                match self.rate_limit(ip, rx) {
                    Limit::Allow | Limit::Leak => (&self.template, Outcome::Answered),
                    Limit::Drop => return (0, Outcome::RateLimited),
                    Limit::Kod => {
                        self.local.add(Counter::KodRate, 1);
                        (&self.kod_rate, Outcome::KodRate)
                    }
                }
            }
        };
        let (template, outcome) = template;
        // Only a request being served normally (not one getting a KoD) is worth the crypto.
        if d.len > crate::proto::HEADER_LEN
            && core::ptr::eq(template, &self.template)
            && let Some((nts, _, _)) = &mut self.nts
        {
            let header = ReplyHeader {
                template,
                receive: self.state.ntp_time(rx),
                transmit: self.state.ntp_time(realtime_ns()),
            };
            match nts.handle(d.buf, d.len, &header) {
                // Longer than 48 bytes but no NTS field in it (a MAC, another extension).
                Verdict::NotNts if action == Action::NtsOnly => {
                    self.local.add(Counter::NotNts, 1);
                    return (0, Outcome::Ignored);
                }
                Verdict::NotNts => {}
                Verdict::Reply(n) => {
                    self.local.add(Counter::Answered, 1);
                    self.local.add(Counter::NtsAnswered, 1);
                    return (n, outcome);
                }
                // An unusable cookie: the client is told so (NTSN), like a refusal.
                Verdict::Nak(n, _) => {
                    self.local.add(Counter::NtsNak, 1);
                    return (n, Outcome::Invalid);
                }
                Verdict::Drop(_) => {
                    self.local.add(Counter::NtsDropped, 1);
                    return (0, Outcome::Invalid);
                }
            }
        }
        self.local.add(Counter::Answered, 1);
        (write_reply(d.buf, template, self.state.ntp_time(rx)), outcome)
    }
}

impl Handler for NtpHandler {
    #[inline]
    fn begin_batch(&mut self) {
        let now = realtime_ns();
        self.batch_realtime_ns = now;
        let state = self.clock.load();
        // Root dispersion grows with time, so the template is rebuilt for every batch; it is a
        // 48-byte encode, far cheaper than the receive syscall that precedes it.
        self.template = ReplyTemplate::new(&state.server_info(now));
        self.state = state;
        // A reload swaps the policy; one atomic load per batch notices it.
        let generation = self.shared_policy.generation();
        if generation != self.policy_generation {
            self.policy = self.shared_policy.load();
            self.policy_generation = generation;
        }
        if let Some((server, keys, generation)) = &mut self.nts
            && keys.generation() != *generation
        {
            *generation = keys.generation();
            server.set_keys(&keys.load());
        }
    }

    #[inline]
    fn handle(&mut self, d: Datagram<'_>) -> usize {
        let peer = d.peer;
        // One copy of `answer` inlined here: a second one on the sampling branch doubled the
        // handler's code and cost 40% of its time (benches/hotpath.rs).
        let (n, outcome) = self.answer(d);
        // `gnomon clients`: a countdown and one branch per request, the rest on 1 in 64 on average.
        self.sample_left -= 1;
        if self.sample_left == 0 {
            // A random gap (1 to 2K-1, mean K), so a periodic mix of clients cannot stay in step
            // with the countdown and hide from it.
            self.sample_left = 1 + self.random() % (2 * SAMPLE_EVERY - 1);
            self.shared.samples.push(peer_ip(&peer), outcome);
        }
        n
    }

    #[inline]
    fn transmit_stamp(&mut self) -> TxStamp {
        let now = realtime_ns();
        TxStamp {
            realtime_ns: now,
            ntp: self.state.ntp_time(now),
        }
    }

    #[inline]
    fn stamp(&mut self, reply: &mut [u8], rx_realtime_ns: i64, tx: &TxStamp) {
        // Only plain replies are 48 bytes; an NTS reply's T3 is under its authenticator already.
        if reply.len() == crate::proto::HEADER_LEN {
            stamp_transmit(reply, tx.ntp);
        }
        if rx_realtime_ns != 0 {
            self.local.record_latency(tx.realtime_ns - rx_realtime_ns);
        }
    }

    fn send_failed(&mut self, reason: SendError, n: usize) {
        self.local.send_failed(reason, n as u64);
    }

    fn rx_queue_dropped(&mut self, n: u64) {
        self.local.add(Counter::KernelRxQueue, n);
    }

    #[inline]
    fn end_batch(&mut self, received: usize, _replied: usize) {
        self.local.record_batch(received);
        self.local.maybe_flush(&self.shared, self.batch_realtime_ns, false);
    }

    fn idle(&mut self) {
        self.local.maybe_flush(&self.shared, realtime_ns(), true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock;
    use crate::policy::{PolicyConfig, RateLimitConfig, Rule};
    use crate::proto::{Destination, Header};

    fn handler(
        rules: &[(&str, Action)],
        default: Action,
        rate_limit: RateLimitConfig,
    ) -> (NtpHandler, Arc<WorkerStats>) {
        let (mut publisher, reader) = clock::snapshot(ClockState::unsynchronized(-24));
        publisher.publish(ClockState::local(2, -24, realtime_ns()));
        let config = PolicyConfig {
            rules: rules
                .iter()
                .map(|(p, action)| Rule {
                    prefix: p.parse().unwrap(),
                    action: *action,
                })
                .collect(),
            default,
            rate_limit,
            lines: Default::default(),
        };
        let policy = Arc::new(SharedPolicy::new(PolicySet::build(config, None)));
        let stats = Arc::new(WorkerStats::new(0, None, "test"));
        (NtpHandler::new(reader, policy, stats.clone()), stats)
    }

    /// One request through the handler; the reply's length (0 = nothing sent).
    fn ask(h: &mut NtpHandler, peer: &str, destination: Option<Destination>, rx_ns: i64) -> (usize, [u8; 64]) {
        let mut buf = [0u8; 64];
        buf[0] = 0x23;
        let n = h.handle(Datagram {
            buf: &mut buf,
            len: 48,
            truncated: false,
            peer: peer.parse().unwrap(),
            rx_realtime_ns: Some(rx_ns),
            destination,
        });
        (n, buf)
    }

    #[test]
    fn unanswerable_requests_never_meet_a_rule() {
        let (mut h, stats) = handler(
            &[("127.0.0.0/8", Action::Exempt)],
            Action::Ignore,
            RateLimitConfig::default(),
        );
        let now = realtime_ns();
        h.begin_batch();
        let broadcast = Destination {
            addr: "127.255.255.255".parse().unwrap(),
            spec_dst: Some("127.0.0.1".parse().unwrap()),
        };
        for (peer, dest) in [
            ("[::ffff:127.0.0.1]:123", None),
            ("[::127.0.0.1]:123", None),
            ("127.0.0.1:0", None),
            ("127.0.0.1:123", Some(broadcast)),
            ("224.0.0.1:123", None),
        ] {
            assert_eq!(ask(&mut h, peer, dest, now).0, 0, "{peer} answered");
        }
        assert_eq!(ask(&mut h, "127.0.0.1:123", None, now).0, 48);
        h.idle();
        assert_eq!(stats.get(Counter::SourceIpv4InIpv6), 2);
        assert_eq!(stats.get(Counter::SourcePortZero), 1);
        assert_eq!(stats.get(Counter::DestinationNotUnicast), 1);
        assert_eq!(stats.get(Counter::SourceNotUnicast), 1);
        // Only the last request met a rule.
        assert_eq!(stats.get(Counter::RuleExempt), 1);
        assert_eq!(stats.get(Counter::RuleIgnore), 0);
        assert_eq!(stats.get(Counter::Answered), 1);
    }

    #[test]
    fn deny_answers_get_the_rate_limit_plus_leak() {
        let rl = RateLimitConfig {
            interval: 1.0,
            burst: 4,
            leak: 10,
            table_bytes: 1 << 16,
            ..RateLimitConfig::default()
        };
        let (mut h, stats) = handler(&[("192.0.2.0/24", Action::Deny)], Action::Serve, rl);
        // Ten requests a second for 100 s of virtual time: ten times the limit.
        let (per_s, secs) = (10i64, 100i64);
        let start = 1_700_000_000_000_000_000i64;
        let mut denies = 0;
        h.begin_batch();
        for i in 0..per_s * secs {
            let (n, buf) = ask(&mut h, "192.0.2.7:123", None, start + i * 1_000_000_000 / per_s);
            if n > 0 {
                assert_eq!(Header::decode(&buf[..n]).unwrap().kiss_code(), Some(RefId::DENY));
                denies += 1;
            }
        }
        h.idle();
        // Allowed 100 + 4, and 1 in 10 of the other ~896 leaked: about 194 of 1000.
        assert!((150..=240).contains(&denies), "{denies} DENY for 1000 requests");
        assert_eq!(stats.get(Counter::KodDeny), denies);
        assert_eq!(stats.get(Counter::RateLimited), 1000 - denies);
    }

    /// An NTS request with a cookie sealed under `keys`, 48-byte header first.
    fn nts_request(keys: &crate::nts::cookie::KeySet) -> Vec<u8> {
        use crate::nts::cookie::{COOKIE_LEN, CookieJar, SessionKeys};
        let session = SessionKeys {
            aead: crate::nts::ke::AEAD_AES_SIV_CMAC_256,
            c2s: [1; 32],
            s2c: [2; 32],
        };
        let mut cookie = [0u8; COOKIE_LEN];
        CookieJar::new(keys).seal(&session, &[3; 16], &mut cookie);
        let mut header = [0u8; crate::proto::HEADER_LEN];
        header[0] = 0x23;
        crate::nts::client::request(&header, &[4; 32], &cookie, 0, &session.c2s, &[5; 16])
    }

    #[test]
    fn nts_only_answers_authenticated_requests_and_drops_plain_ones() {
        use crate::nts::cookie::KeySet;
        let keys = KeySet::derive(b"nts-only test", 1, 1);
        let (h, stats) = handler(
            &[("192.0.2.0/24", Action::NtsOnly)],
            Action::Serve,
            RateLimitConfig::default(),
        );
        let mut h = h.with_nts(Arc::new(SharedKeys::new(keys.clone())));
        let now = realtime_ns();
        h.begin_batch();
        // Plain: 48 bytes, and 48 bytes plus an extension that is not NTS.
        assert_eq!(ask(&mut h, "192.0.2.7:123", None, now).0, 0);
        let mut buf = [0u8; 2048];
        buf[0] = 0x23;
        buf[48..52].copy_from_slice(&[0x20, 0x02, 0, 16]);
        let other_ef = h.handle(Datagram {
            buf: &mut buf,
            len: 64,
            truncated: false,
            peer: "192.0.2.7:123".parse().unwrap(),
            rx_realtime_ns: Some(now),
            destination: None,
        });
        assert_eq!(other_ef, 0);
        // Authenticated: answered.
        let req = nts_request(&keys);
        buf[..req.len()].copy_from_slice(&req);
        let n = h.handle(Datagram {
            buf: &mut buf,
            len: req.len(),
            truncated: false,
            peer: "192.0.2.7:123".parse().unwrap(),
            rx_realtime_ns: Some(now),
            destination: None,
        });
        assert!(n > 48, "NTS request from an nts-only client not answered");
        // Another client's plain request is still served.
        assert_eq!(ask(&mut h, "198.51.100.1:123", None, now).0, 48);
        h.idle();
        assert_eq!(stats.get(Counter::RuleNtsOnly), 3);
        assert_eq!(stats.get(Counter::NotNts), 2);
        assert_eq!(stats.get(Counter::NtsAnswered), 1);
        assert_eq!(stats.get(Counter::Answered), 2);
    }

    #[test]
    fn nts_only_without_nts_answers_nobody() {
        let (mut h, stats) = handler(&[], Action::NtsOnly, RateLimitConfig::default());
        h.begin_batch();
        assert_eq!(ask(&mut h, "192.0.2.7:123", None, realtime_ns()).0, 0);
        h.idle();
        assert_eq!(stats.get(Counter::NotNts), 1);
    }
}

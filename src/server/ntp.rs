//! The NTP handler: request checks, policy, and the reply stamped from the clock snapshot.

use super::socket::{SendError, peer_ip};
use super::stats::{Counter, LocalStats, WorkerStats};
use super::{Datagram, Handler, TxStamp};
use crate::clock::{ClockReader, ClockState, realtime_ns};
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
    local: LocalStats,
    shared: Arc<WorkerStats>,
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
            local: LocalStats::default(),
            shared,
        }
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
    }

    #[inline]
    fn handle(&mut self, d: Datagram<'_>) -> usize {
        if !self.local.received(d.truncated) {
            return 0;
        }
        if let Err(e) = check_request(&d.buf[..d.len]) {
            self.local.add(Counter::from_request_error(e), 1);
            return 0;
        }
        // Before any policy: a reply that cannot reach the client is never built, and an address
        // spelled to look like another (::ffff:127.0.0.1) never meets a rule.
        if let Err(u) = check_addresses(d.peer, d.destination) {
            self.local.add(Counter::from_unanswerable(u), 1);
            return 0;
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
            Action::Serve | Action::Exempt => &self.template,
            Action::Ignore => {
                self.local.add(Counter::Ignored, 1);
                return 0;
            }
            // A refused client's answer is limited like any other, or a spoofed flood would
            // turn the server into a 1:1 reflector of DENYs at line rate.
            Action::Deny => match self.rate_limit(ip, rx) {
                Limit::Drop => return 0,
                Limit::Allow | Limit::Leak | Limit::Kod => {
                    self.local.add(Counter::KodDeny, 1);
                    &self.kod_deny
                }
            },
            Action::Limited => match self.rate_limit(ip, rx) {
                Limit::Allow | Limit::Leak => &self.template,
                Limit::Drop => return 0,
                // The limiter sends at most one per client per KoD window: limited too.
                Limit::Kod => {
                    self.local.add(Counter::KodRate, 1);
                    &self.kod_rate
                }
            },
        };
        self.local.add(Counter::Answered, 1);
        write_reply(d.buf, template, self.state.ntp_time(rx))
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
        stamp_transmit(reply, tx.ntp);
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

//! The NTP handler: request checks, policy, and the reply stamped from the clock snapshot.

use super::stats::{Counter, LocalStats, WorkerStats};
use super::{Datagram, Handler, TxStamp};
use crate::clock::{ClockReader, ClockState, realtime_ns};
use crate::proto::{ReplyTemplate, check_request, stamp_transmit, write_reply};
use std::sync::Arc;

/// One worker's NTP handler. Everything it needs per batch is read once in `begin_batch`.
pub struct NtpHandler {
    clock: ClockReader,
    state: ClockState,
    template: ReplyTemplate,
    batch_realtime_ns: i64,
    local: LocalStats,
    shared: Arc<WorkerStats>,
}

impl NtpHandler {
    pub fn new(clock: ClockReader, shared: Arc<WorkerStats>) -> NtpHandler {
        let state = clock.load();
        NtpHandler {
            template: ReplyTemplate::new(&state.server_info(0)),
            clock,
            state,
            batch_realtime_ns: 0,
            local: LocalStats::default(),
            shared,
        }
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
    }

    #[inline]
    fn handle(&mut self, d: Datagram<'_>) -> usize {
        self.local.add(Counter::Received, 1);
        if d.truncated {
            self.local.add(Counter::Oversized, 1);
            return 0;
        }
        if let Err(e) = check_request(&d.buf[..d.len]) {
            self.local.add(Counter::from_request_error(e), 1);
            return 0;
        }
        let rx = match d.rx_realtime_ns {
            Some(t) => t,
            None => {
                self.local.add(Counter::NoTimestamp, 1);
                self.batch_realtime_ns
            }
        };
        self.local.add(Counter::Answered, 1);
        write_reply(d.buf, &self.template, self.state.ntp_time(rx))
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

    fn send_failed(&mut self, n: usize) {
        self.local.add(Counter::SendFailed, n as u64);
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

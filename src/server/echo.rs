//! The bare UDP echo handler: the ceiling gnomon is measured against. It runs in the same worker
//! loop and backend as the NTP handler but sends every datagram back unchanged.

use super::stats::{Counter, LocalStats, WorkerStats};
use super::{Datagram, Handler, TxStamp};
use crate::clock::realtime_ns;
use std::sync::Arc;

pub struct EchoHandler {
    local: LocalStats,
    shared: Arc<WorkerStats>,
    last_tx_ns: i64,
}

impl EchoHandler {
    pub fn new(shared: Arc<WorkerStats>) -> EchoHandler {
        EchoHandler {
            local: LocalStats::default(),
            shared,
            last_tx_ns: 0,
        }
    }
}

impl Handler for EchoHandler {
    fn begin_batch(&mut self) {}

    #[inline]
    fn handle(&mut self, d: Datagram<'_>) -> usize {
        if !self.local.received(d.truncated) {
            return 0;
        }
        self.local.add(Counter::Answered, 1);
        d.len
    }

    fn transmit_stamp(&mut self) -> TxStamp {
        // The same one clock read per batch as the NTP handler, so the comparison is fair.
        let now = realtime_ns();
        self.last_tx_ns = now;
        TxStamp {
            realtime_ns: now,
            ntp: crate::proto::NtpTimestamp::ZERO,
        }
    }

    #[inline]
    fn stamp(&mut self, _reply: &mut [u8], rx_realtime_ns: i64, tx: &TxStamp) {
        if rx_realtime_ns != 0 {
            self.local.record_latency(tx.realtime_ns - rx_realtime_ns);
        }
    }

    fn send_failed(&mut self, reason: super::socket::SendError, n: usize) {
        self.local.send_failed(reason, n as u64);
    }

    fn rx_queue_dropped(&mut self, n: u64) {
        self.local.add(Counter::KernelRxQueue, n);
    }

    fn end_batch(&mut self, received: usize, _replied: usize) {
        self.local.record_batch(received);
        self.local.maybe_flush(&self.shared, self.last_tx_ns, false);
    }

    fn idle(&mut self) {
        self.local.maybe_flush(&self.shared, realtime_ns(), true);
    }
}

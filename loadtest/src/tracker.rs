//! The table of requests in flight, shared by the sender (writes a slot per request) and the
//! receiver (matches replies, marks them answered). A ring indexed by sequence number: lock-free,
//! bounded memory; a reply that comes back after its slot was reused counts as unmatched.

use crate::validate::Invalid;
use std::sync::atomic::{AtomicU64, Ordering};

const SEQ_BITS: u32 = 40;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const STREAM_BITS: u32 = 12;
const STEP_BITS: u32 = 11;
const REPLIED: u64 = 1 << 63;
/// A slot that never held a request: its sequence field is all ones, which no request uses.
const EMPTY: u64 = SEQ_MASK;

/// The largest sequence number, stream id and ramp step a slot can hold.
pub const MAX_SEQ: u64 = SEQ_MASK - 1;
pub const MAX_STREAMS: usize = 1 << STREAM_BITS;
pub const MAX_STEPS: usize = 1 << STEP_BITS;

/// What the sender recorded about a request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Sent {
    /// 0 = the client population, 1.. = the abusers in command-line order.
    pub stream: u16,
    /// Index of the ramp step (0 for a fixed-rate run).
    pub step: u16,
    /// Nanoseconds since the run started, taken just before the batch was handed to the kernel.
    pub sent_ns: u64,
}

struct Slot {
    state: AtomicU64,
    sent_ns: AtomicU64,
}

pub struct Tracker {
    slots: Box<[Slot]>,
    mask: u64,
}

impl Tracker {
    /// A ring of 2^`bits` slots.
    pub fn new(bits: u32) -> Tracker {
        let n = 1usize << bits;
        Tracker {
            slots: (0..n)
                .map(|_| Slot {
                    state: AtomicU64::new(EMPTY),
                    sent_ns: AtomicU64::new(0),
                })
                .collect(),
            mask: (n - 1) as u64,
        }
    }

    /// Called by the sender before the request leaves, so the receiver always finds it.
    #[inline]
    pub fn record(&self, seq: u64, sent: Sent) {
        debug_assert!(seq <= MAX_SEQ && (sent.stream as usize) < MAX_STREAMS && (sent.step as usize) < MAX_STEPS);
        let slot = &self.slots[(seq & self.mask) as usize];
        slot.sent_ns.store(sent.sent_ns, Ordering::Relaxed);
        let state = seq | (sent.stream as u64) << SEQ_BITS | (sent.step as u64) << (SEQ_BITS + STREAM_BITS);
        slot.state.store(state, Ordering::Release);
    }

    /// Matches a reply to its request and marks the request answered.
    #[inline]
    pub fn answer(&self, seq: u64) -> Result<Sent, Invalid> {
        if seq > MAX_SEQ {
            return Err(Invalid::Unmatched);
        }
        let slot = &self.slots[(seq & self.mask) as usize];
        let state = slot.state.load(Ordering::Acquire);
        if state & SEQ_MASK != seq {
            return Err(Invalid::Unmatched);
        }
        if state & REPLIED != 0 {
            return Err(Invalid::Duplicate);
        }
        let sent_ns = slot.sent_ns.load(Ordering::Relaxed);
        // The sender may reuse the slot meanwhile; then this reply is stale, not a match.
        if slot
            .state
            .compare_exchange(state, state | REPLIED, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return Err(Invalid::Unmatched);
        }
        Ok(Sent {
            stream: ((state >> SEQ_BITS) & ((1 << STREAM_BITS) - 1)) as u16,
            step: ((state >> (SEQ_BITS + STREAM_BITS)) & ((1 << STEP_BITS) - 1)) as u16,
            sent_ns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_once_then_duplicate() {
        let t = Tracker::new(4);
        let s = Sent {
            stream: 5,
            step: 1000,
            sent_ns: 1234,
        };
        t.record(3, s);
        assert_eq!(t.answer(3), Ok(s));
        assert_eq!(t.answer(3), Err(Invalid::Duplicate));
    }

    #[test]
    fn never_sent_and_overwritten_are_unmatched() {
        let t = Tracker::new(4);
        assert_eq!(t.answer(0), Err(Invalid::Unmatched));
        assert_eq!(t.answer(u64::MAX), Err(Invalid::Unmatched));
        let s = Sent {
            stream: 0,
            step: 0,
            sent_ns: 1,
        };
        t.record(2, s);
        t.record(2 + 16, s);
        assert_eq!(t.answer(2), Err(Invalid::Unmatched));
        assert_eq!(t.answer(18), Ok(s));
    }
}

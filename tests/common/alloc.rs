//! A counting global allocator for the zero-allocation checks: each test binary that needs it
//! declares `#[global_allocator] static GLOBAL: common::alloc::Counting = common::alloc::Counting;`
//! and wraps the code under test in [`allocations`].
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);
thread_local!(static COUNTING: Cell<bool> = const { Cell::new(false) });

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // Only the thread under test counts, so tests running beside it cannot add to it.
        if COUNTING.with(|c| c.get()) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
}

/// Runs `f` and returns its result with the number of allocations this thread made in it.
pub fn allocations<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (r, ALLOCS.load(Ordering::Relaxed) - before)
}

//! Monotonic time from the TSC, in milliseconds and microseconds since boot.
//!
//! The state lives in guest memory, so it carries over snapshots and
//! migrations; readings never go backwards (should the TSC of a restored VM
//! ever be behind, the clock just stands still until it catches up).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cpu;

static TSC_HZ: AtomicU64 = AtomicU64::new(0);
static TSC_START: AtomicU64 = AtomicU64::new(0);
static LAST_US: AtomicU64 = AtomicU64::new(0);

/// Starts the clock at 0 with the given TSC frequency.
pub fn init(tsc_hz: u64) {
    TSC_HZ.store(tsc_hz.max(1), Ordering::Relaxed);
    TSC_START.store(cpu::rdtsc(), Ordering::Relaxed);
}

/// Microseconds since [`init`].
pub fn now_us() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed).max(1);
    let elapsed = cpu::rdtsc().saturating_sub(TSC_START.load(Ordering::Relaxed));
    let us = (u128::from(elapsed) * 1_000_000 / u128::from(hz)) as u64;
    let last = LAST_US.load(Ordering::Relaxed);
    if us > last {
        LAST_US.store(us, Ordering::Relaxed);
        us
    } else {
        last
    }
}

/// Milliseconds since [`init`].
pub fn now_ms() -> u64 {
    now_us() / 1000
}

//! Per-thread striping: a stable small index per thread, and counters that threads bump without
//! sharing a cache line.
//!
//! Invariants:
//! 1. A thread's stripe never changes during its lifetime (assigned round-robin on first use).
//! 2. A [`StripedCounter`]'s value is the sum of its stripes; each stripe only grows, so a sum read
//!    while other threads count is a value the counter had at some moment between the first and
//!    the last stripe load (no torn 64-bit values, no decrease).
//!
//! The atomics here are always std's, also under `cfg(loom)`: a statistic publishes nothing, so
//! no loom model needs to explore its interleavings, and std's atomics can sit in a `static` and
//! a `thread_local!` (loom's cannot), which lets the loom-compiled TDP MMU count through
//! [`StripedCounter`] like every other build.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Number of stripes (a power of two).
#[cfg(not(loom))]
pub(crate) const STRIPES: usize = 16;
/// Under loom one stripe: a model has a handful of threads, and every counter is built on a
/// loom thread's small stack (16 stripes of a cache line each made the TDP MMU's counters
/// overflow it).
#[cfg(loom)]
pub(crate) const STRIPES: usize = 1;

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // ORDERING: Relaxed: the counter only hands out distinct-ish indexes; no data is published
    // through it.
    static STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
}

/// The calling thread's stripe index, in `0..STRIPES`.
#[inline]
pub(crate) fn stripe() -> usize {
    STRIPE.with(|s| *s)
}

#[repr(align(128))]
#[derive(Default)]
struct PaddedCounter(AtomicU64);

/// A monotonically increasing event counter striped over [`STRIPES`] cache lines.
#[derive(Default)]
pub(crate) struct StripedCounter([PaddedCounter; STRIPES]);

impl StripedCounter {
    /// Adds `n` to the calling thread's stripe.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        // ORDERING: Relaxed: a statistics counter; readers want a total, not a synchronisation
        // point (invariant 2).
        self.0[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds `n` unless it is zero (skips touching even the own stripe's line).
    #[inline]
    pub(crate) fn add_nonzero(&self, n: u64) {
        if n != 0 {
            self.add(n);
        }
    }

    /// Sum over all stripes.
    pub(crate) fn sum(&self) -> u64 {
        // ORDERING: Relaxed: see `add`.
        self.0.iter().map(|c| c.0.load(Ordering::Relaxed)).sum()
    }
}

impl core::fmt::Debug for StripedCounter {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "StripedCounter({})", self.sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn striped_counter_sums_across_threads() {
        let c = StripedCounter::default();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..1000 {
                        c.add(1);
                    }
                });
            }
        });
        assert_eq!(c.sum(), 4000);
    }

    #[test]
    fn stripe_is_stable_and_in_range() {
        let a = stripe();
        assert_eq!(a, stripe());
        assert!(a < STRIPES);
    }
}

//! Per-thread striping: a stable small index per thread, and counters that threads bump without
//! sharing a cache line.
//!
//! Invariants:
//! 1. A thread's stripe never changes during its lifetime (assigned round-robin on first use).
//! 2. A [`StripedCounter`]'s value is the sum of its stripes; each stripe only grows, so a sum read
//!    while other threads count is a value the counter had at some moment between the first and
//!    the last stripe load (no torn 64-bit values, no decrease).
//! 3. A [`StripedCounter`] stripe `k < STRIPES` is written only by the thread owning stripe
//!    number `k` (the SRCU claim); the last stripe is shared and written with `fetch_add`. So no
//!    add is lost although an owned stripe's add is a plain load and store.
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

/// A statistics counter with one cache-padded stripe per owning thread plus a shared one.
///
/// Stripe `k < STRIPES` is written only by the thread that owns stripe number `k` (the SRCU claim,
/// [`super::srcu::owned_stripe`], held for the thread's lifetime), so its `add` is a load and a
/// store, not a locked read-modify-write; every other thread (numbers `>= STRIPES`, or none) adds
/// to the shared stripe `STRIPES` with `fetch_add`. docs/locking.md, "Counters a thread owns".
#[derive(Default)]
pub(crate) struct StripedCounter([PaddedCounter; STRIPES + 1]);

impl StripedCounter {
    /// Adds `n` on the calling thread's stripe.
    #[inline(always)]
    pub(crate) fn add(&self, n: u64) {
        let k = super::srcu::owned_stripe();
        if let Some(own) = self.0.get(..STRIPES).and_then(|s| s.get(k)) {
            // ORDERING: Relaxed load and store: only this thread writes stripe `k` while it owns
            // number `k` (invariant 3), so no other add can fall between them; the previous
            // owner's last store is ordered before this load by the claim's Release/Acquire
            // hand-over (srcu.rs `claim`). Readers (`sum`) only need an untorn value.
            let v = own.0.load(Ordering::Relaxed);
            own.0.store(v.wrapping_add(n), Ordering::Relaxed);
        } else {
            // ORDERING: Relaxed: a statistic; the RMW keeps concurrent adds of sharing threads.
            self.0[STRIPES].0.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// [`Self::add`], skipped for 0.
    #[inline]
    pub(crate) fn add_nonzero(&self, n: u64) {
        if n != 0 {
            self.add(n);
        }
    }

    /// The total.
    pub(crate) fn sum(&self) -> u64 {
        // ORDERING: Relaxed: statistics (invariant 2).
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

    /// Invariant 3: more threads than owned stripes, in waves so that exiting threads release
    /// their numbers and new ones claim them, all adding at once: an owned stripe written by two
    /// threads, or a new owner not continuing from the last one's value, would lose adds.
    #[test]
    fn striped_counter_loses_no_add_across_owners_sharers_and_thread_churn() {
        const WAVES: u64 = 3;
        const THREADS: u64 = 32;
        const ADDS: u64 = 100_000;
        let c = StripedCounter::default();
        for _ in 0..WAVES {
            let start = std::sync::Barrier::new(THREADS as usize);
            std::thread::scope(|s| {
                for _ in 0..THREADS {
                    s.spawn(|| {
                        start.wait();
                        for i in 0..ADDS {
                            c.add(1);
                            if i % 128 == 0 {
                                // Interleave the threads on this (possibly small) machine.
                                std::thread::yield_now();
                            }
                        }
                    });
                }
            });
        }
        assert_eq!(c.sum(), WAVES * THREADS * ADDS);
    }

    #[test]
    fn stripe_is_stable_and_in_range() {
        let a = stripe();
        assert_eq!(a, stripe());
        assert!(a < STRIPES);
    }
}

//! The pass counter the test-only fault-injection hooks of both MMUs share (feature
//! `test-hooks`; the TDP MMU's `hooks` module and the rmap's `hooks` module): a knob is a
//! process-wide period (`0` = off), and every `period`-th pass through a hook site takes the
//! injected path. Their invariant 1 holds here too: which pass is chosen changes no correctness
//! argument, only how often a rare interleaving happens.

use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// True if this pass through a site with knob `period` is an injected one; counts the pass in
/// `ticks` and an injection in `hits`.
pub(crate) fn tick(period: &AtomicU32, ticks: &AtomicU64, hits: &AtomicU64) -> bool {
    // ORDERING: Relaxed: the period is a knob and the tick counter only spreads injections; no
    // invariant depends on which pass is chosen (invariant 1 of the hooks modules).
    let p = period.load(Ordering::Relaxed);
    if p == 0 {
        return false;
    }
    // ORDERING: as above.
    let hit = ticks
        .fetch_add(1, Ordering::Relaxed)
        .is_multiple_of(u64::from(p));
    if hit {
        // ORDERING: statistics.
        hits.fetch_add(1, Ordering::Relaxed);
    }
    hit
}

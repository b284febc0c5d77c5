//! Test-only fault injection for the TDP MMU (feature `test-hooks`): forced compare-and-swap
//! failures and forced yields at chosen points, to drive the retry paths under a torture run.
//!
//! # Protocol
//! The knobs are process-wide periods (`0` = off): every `n`-th pass through a hook site takes the
//! injected path. A forced CAS failure behaves exactly like a lost race (the fault returns
//! [`super::FaultOutcome::Retry`] with nothing installed); a forced yield calls
//! [`crate::sync::yield_now`] where the code may legally be preempted.
//!
//! # Invariants
//! 1. An injected path is one the real code can take anyway (a lost CAS, a preemption), so the
//!    hooks never make a correct MMU fail; they only make rare interleavings frequent.
//! 2. With the feature off this module does not exist and the hook sites compile to nothing.

use crate::mmu::inject::tick;
use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};

static CAS_FAIL_PERIOD: AtomicU32 = AtomicU32::new(0);
static YIELD_PERIOD: AtomicU32 = AtomicU32::new(0);
static CAS_TICKS: AtomicU64 = AtomicU64::new(0);
static YIELD_TICKS: AtomicU64 = AtomicU64::new(0);
static CAS_FORCED: AtomicU64 = AtomicU64::new(0);
static YIELDS_FORCED: AtomicU64 = AtomicU64::new(0);

/// Makes every `period`-th SPTE compare-and-swap of a fault (table link or leaf install) fail as
/// if it lost a race; `0` turns injection off. Process-wide.
pub fn set_cas_failure_period(period: u32) {
    // ORDERING: Relaxed: a tuning knob; no data is published through it.
    CAS_FAIL_PERIOD.store(period, Ordering::Relaxed);
}

/// Makes every `period`-th pass through a yield site (fault before its leaf CAS, ager before its
/// AND, zap per leaf) call `yield_now`; `0` turns injection off. Process-wide.
pub fn set_yield_period(period: u32) {
    // ORDERING: Relaxed: a tuning knob; no data is published through it.
    YIELD_PERIOD.store(period, Ordering::Relaxed);
}

/// How many CAS failures and yields have been injected so far (process-wide).
pub fn injected() -> (u64, u64) {
    // ORDERING: Relaxed: statistics.
    (
        CAS_FORCED.load(Ordering::Relaxed),
        YIELDS_FORCED.load(Ordering::Relaxed),
    )
}

/// True if this CAS must be treated as lost (hook site in `map`).
pub(super) fn force_cas_failure() -> bool {
    tick(&CAS_FAIL_PERIOD, &CAS_TICKS, &CAS_FORCED)
}

/// Yields the thread if this pass is chosen (hook sites in `map`, the ager and the zap).
pub(super) fn maybe_yield() {
    if tick(&YIELD_PERIOD, &YIELD_TICKS, &YIELDS_FORCED) {
        crate::sync::yield_now();
    }
}

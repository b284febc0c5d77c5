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
static WALK_YIELD_PERIOD: AtomicU32 = AtomicU32::new(0);
static WALK_YIELD_TICKS: AtomicU64 = AtomicU64::new(0);
static WALK_YIELDS_FORCED: AtomicU64 = AtomicU64::new(0);

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

/// Makes every `period`-th step of a vCPU's guest-mode walk (`guest_walk`) from a table down to
/// the child table it links call `yield_now` between loading the link and reading the child;
/// `0` turns injection off. Process-wide, separate from [`set_yield_period`] so that a torture run
/// can preempt walks often without slowing every other site. A preemption there is one a real
/// thread can suffer anyway; it widens the window in which a zap can unlink (and, if broken,
/// free) the child while the walk still holds its address (G1 in docs/locking.md).
pub fn set_walk_yield_period(period: u32) {
    // ORDERING: Relaxed: a tuning knob; no data is published through it.
    WALK_YIELD_PERIOD.store(period, Ordering::Relaxed);
}

/// How many yields have been injected into guest-mode walks so far (process-wide).
pub fn walk_yields() -> u64 {
    // ORDERING: Relaxed: statistics.
    WALK_YIELDS_FORCED.load(Ordering::Relaxed)
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

/// Yields the thread if this step of a guest-mode walk is chosen (hook site in `guest_walk`).
#[inline]
pub(super) fn maybe_yield_in_walk() {
    if tick(&WALK_YIELD_PERIOD, &WALK_YIELD_TICKS, &WALK_YIELDS_FORCED) {
        crate::sync::yield_now();
    }
}

/// Yields the thread if this pass is chosen (hook sites in `map`, the ager and the zap).
pub(super) fn maybe_yield() {
    if tick(&YIELD_PERIOD, &YIELD_TICKS, &YIELDS_FORCED) {
        crate::sync::yield_now();
    }
}

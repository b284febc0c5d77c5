//! Test-only fault injection for the rmap bit lock and lockless rmap aging (feature `test-hooks`):
//! forced compare-and-swap failures and forced yields at chosen points, to drive the retry and
//! contention paths under a torture run. The TDP twin is the TDP MMU's `hooks` module; the knobs
//! have the same shape (a period, `0` = off) and are set together by the torture module.
//!
//! # Protocol
//! The knobs are process-wide periods: every `n`-th pass through a hook site takes the injected
//! path. The sites ([`YieldSite`]) are:
//! - the bit-lock acquire (`__kvm_rmap_lock`): between reading the head word and the CAS that sets
//!   LOCKED a yield may be forced ([`YieldSite::BeforeLockCas`]), and the CAS itself may be forced
//!   to fail. A forced failure behaves exactly like a spurious `compare_exchange_weak` failure or a
//!   lost race: the locker re-reads the word and goes round its loop again (spinning while LOCKED
//!   is set, returning 0 if the rmap became empty);
//! - right after the bit was taken, by a writer or a read-only locker
//!   ([`YieldSite::HoldingLock`]): the holder is preempted with the bit held, so every other
//!   locker of that rmap spins and falls back to yielding;
//! - in lockless aging, between reading an SPTE and clearing its Accessed bit
//!   ([`YieldSite::AgeBeforeClear`]), where a vCPU may set Dirty and a page zap may clear the SPTE.
//!
//! # Invariants
//! 1. An injected path is one the real code can take anyway (a spurious or lost CAS, a
//!    preemption, which userspace cannot disable), so the hooks never make a correct MMU fail;
//!    they only make rare interleavings frequent.
//! 2. With the feature off the knobs do not exist and every hook site is an empty `#[inline]`
//!    function that compiles to nothing.
//! 3. Statistics (`injected`) count injections only; they are process-wide and monotonic.

#[cfg(feature = "test-hooks")]
pub use imp::*;

#[cfg(not(feature = "test-hooks"))]
pub(super) use off::*;

/// Where a forced yield happens (see the module protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum YieldSite {
    /// In the bit-lock acquire, between reading the head word and the CAS that locks it.
    BeforeLockCas,
    /// Right after the bit was taken (writers and read-only lockers).
    HoldingLock,
    /// In lockless aging, between reading a young SPTE and clearing its Accessed bit.
    AgeBeforeClear,
}

#[cfg(not(feature = "test-hooks"))]
mod off {
    use super::YieldSite;

    /// Never forces a failure (feature `test-hooks` off).
    #[inline(always)]
    pub(in super::super) fn force_cas_failure() -> bool {
        false
    }

    /// Does nothing (feature `test-hooks` off).
    #[inline(always)]
    pub(in super::super) fn maybe_yield(_site: YieldSite) {}
}

#[cfg(feature = "test-hooks")]
mod imp {
    use super::YieldSite;
    use crate::mmu::inject::tick;
    use crate::sync::atomic::{AtomicU32, AtomicU64, Ordering};

    static CAS_FAIL_PERIOD: AtomicU32 = AtomicU32::new(0);
    static YIELD_PERIOD: AtomicU32 = AtomicU32::new(0);
    static CAS_TICKS: AtomicU64 = AtomicU64::new(0);
    static YIELD_TICKS: AtomicU64 = AtomicU64::new(0);
    static CAS_FORCED: AtomicU64 = AtomicU64::new(0);
    static YIELDS_BEFORE_CAS: AtomicU64 = AtomicU64::new(0);
    static YIELDS_HOLDING: AtomicU64 = AtomicU64::new(0);
    static YIELDS_AGE: AtomicU64 = AtomicU64::new(0);

    /// Injections so far, per kind and site (process-wide, monotonic).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RmapInjected {
        /// Forced failures of the bit-lock CAS.
        pub cas_failures: u64,
        /// Forced yields at [`YieldSite::BeforeLockCas`].
        pub yields_before_lock_cas: u64,
        /// Forced yields at [`YieldSite::HoldingLock`].
        pub yields_holding_lock: u64,
        /// Forced yields at [`YieldSite::AgeBeforeClear`].
        pub yields_age_before_clear: u64,
    }

    impl RmapInjected {
        /// Forced yields at every site.
        pub fn yields(&self) -> u64 {
            self.yields_before_lock_cas + self.yields_holding_lock + self.yields_age_before_clear
        }
    }

    /// Makes every `period`-th bit-lock CAS (writers and read-only lockers) fail as if it lost a
    /// race; `0` turns injection off. Process-wide.
    pub fn set_cas_failure_period(period: u32) {
        // ORDERING: Relaxed: a tuning knob; no data is published through it.
        CAS_FAIL_PERIOD.store(period, Ordering::Relaxed);
    }

    /// Makes every `period`-th pass through a yield site (any [`YieldSite`]) call `yield_now`;
    /// `0` turns injection off. Process-wide.
    pub fn set_yield_period(period: u32) {
        // ORDERING: Relaxed: a tuning knob; no data is published through it.
        YIELD_PERIOD.store(period, Ordering::Relaxed);
    }

    /// How many CAS failures and yields have been injected so far (process-wide).
    pub fn injected() -> RmapInjected {
        // ORDERING: Relaxed: statistics.
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RmapInjected {
            cas_failures: get(&CAS_FORCED),
            yields_before_lock_cas: get(&YIELDS_BEFORE_CAS),
            yields_holding_lock: get(&YIELDS_HOLDING),
            yields_age_before_clear: get(&YIELDS_AGE),
        }
    }

    /// True if this bit-lock CAS must be treated as failed (hook site in `lock_raw`).
    #[inline]
    pub(in super::super) fn force_cas_failure() -> bool {
        tick(&CAS_FAIL_PERIOD, &CAS_TICKS, &CAS_FORCED)
    }

    /// Yields the thread if this pass through `site` is chosen.
    #[inline]
    pub(in super::super) fn maybe_yield(site: YieldSite) {
        let hits = match site {
            YieldSite::BeforeLockCas => &YIELDS_BEFORE_CAS,
            YieldSite::HoldingLock => &YIELDS_HOLDING,
            YieldSite::AgeBeforeClear => &YIELDS_AGE,
        };
        if tick(&YIELD_PERIOD, &YIELD_TICKS, hits) {
            crate::sync::yield_now();
        }
    }
}

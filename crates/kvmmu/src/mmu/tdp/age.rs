//! Lockless aging (`kvm_tdp_mmu_age_gfn_range` / `kvm_tdp_mmu_test_age_gfn`, spec §3.8), and
//! clearing Dirty for dirty logging (`clear_dirty_gfn_range`).
//!
//! Aging holds only an RCU guard: no `mmu_lock`, no reference on the root (P4), no yield, no TLB
//! flush. It visits the present leaves of the valid root of one address space and clears Accessed
//! with one `fetch_and(!A)` where A is set (spte.rs O4), so it never changes a table pointer, bit
//! 11 or the pfn, and can never lose a concurrent Dirty or Writable update (spec items 14–20).

use crate::addr::{AsId, GfnRange};
use crate::mmu::spte::{ACCESSED_MASK, DIRTY_MASK};
use crate::sync::atomic::Ordering;
use crate::sync::rcu::RcuGuard;
use crate::sync::witness::MmuRead;

use super::iter::TdpIter;
use super::table::GFN_LIMIT;
use super::{Counters, TdpMmu};

/// What to do with each present leaf whose `mask` bit is set.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Return at the first one.
    Test,
    /// Clear the bit with one atomic AND.
    Clear,
}

impl TdpMmu {
    /// Clears Accessed on every present leaf of `as_id`'s valid root in `range` where it is set;
    /// returns true if any was set (`kvm_age_gfn`). Invalid roots are not aged (spec item 20).
    /// Needs no `mmu_lock`; the caller may hold it (locked aging mode).
    pub fn age_gfn_range(&self, as_id: AsId, range: GfnRange, rcu: &RcuGuard<'_>) -> bool {
        let (observed, cleared) = self.walk_leaves(as_id, range, ACCESSED_MASK, Action::Clear, rcu);
        Counters::add(&self.inner.counters.accessed_cleared, cleared);
        observed != 0
    }

    /// True if some present leaf of `as_id`'s valid root in `range` has Accessed set
    /// (`kvm_test_age_gfn`). Modifies nothing and returns at the first young leaf.
    pub fn test_age_gfn_range(&self, as_id: AsId, range: GfnRange, rcu: &RcuGuard<'_>) -> bool {
        self.walk_leaves(as_id, range, ACCESSED_MASK, Action::Test, rcu)
            .0
            != 0
    }

    /// Clears Dirty on the present leaves of `as_id`'s valid root in `range` (the D-bit flavour of
    /// `kvm_tdp_mmu_clear_dirty_slot`, for dirty logging); returns true if any was dirty. Runs
    /// under `mmu_lock` read: one atomic AND per dirty leaf, so a racing CPU D-bit set either
    /// lands before (and is harvested) or after (and stays).
    pub fn clear_dirty_gfn_range(
        &self,
        as_id: AsId,
        range: GfnRange,
        _mmu: &MmuRead,
        rcu: &RcuGuard<'_>,
    ) -> bool {
        self.walk_leaves(as_id, range, DIRTY_MASK, Action::Clear, rcu)
            .0
            != 0
    }

    /// Visits the present leaves with `mask` set; returns how many were observed with it (at most
    /// 1 for [`Action::Test`]) and how many of those this call cleared itself.
    fn walk_leaves(
        &self,
        as_id: AsId,
        range: GfnRange,
        mask: u64,
        action: Action,
        rcu: &RcuGuard<'_>,
    ) -> (u64, u64) {
        self.assert_rcu_domain(rcu);
        let start = range.start().raw();
        let end = range.end().raw().min(GFN_LIMIT);
        if start >= end {
            return (0, 0);
        }
        let Some(root) = self.inner.valid_root(as_id) else {
            return (0, 0);
        };
        // SAFETY: found through the valid-root slot under `rcu` (P4).
        let root = unsafe { root.get() };
        // ORDERING: a stale "valid" only means aging a root that was just invalidated, which is
        // harmless (spec item 18 tolerates it); the kernel has the same window.
        if root.invalid.load(Ordering::Relaxed) {
            return (0, 0);
        }
        let (mut observed, mut cleared) = (0, 0);
        // SAFETY: the root table stays allocated while `rcu` is pinned (P4).
        let mut it = unsafe { TdpIter::new(root.table, start, end, rcu) };
        while it.valid() {
            let old = it.old();
            if old.is_present_leaf(it.level()) && old.raw() & mask != 0 {
                match action {
                    Action::Test => return (1, 0),
                    Action::Clear => {
                        #[cfg(feature = "test-hooks")]
                        super::hooks::maybe_yield();
                        #[cfg(not(feature = "broken-plain-store"))]
                        // ORDERING: O4 — the AND's atomicity, not its ordering, is what keeps a
                        // concurrent D/W update; the bit carries no data dependency.
                        let prev = it.sptep().fetch_and(!mask, Ordering::Relaxed);
                        #[cfg(feature = "broken-plain-store")]
                        let prev = broken_plain_clear(it.sptep(), old, mask);
                        // The leaf was observed with the bit either way; a racing zap or ager may
                        // have cleared it first, so count as cleared only what this AND removed.
                        observed += 1;
                        cleared += u64::from(prev.raw() & mask != 0);
                        it.set_old(prev);
                    }
                }
            }
            it.next();
        }
        (observed, cleared)
    }
}

/// The deliberately broken ager of feature `broken-plain-store` (test-only; the torture tests
/// assert it is caught): clears `mask` with a plain store of the stale snapshot `old` instead of
/// an atomic AND, after a yield that widens the window. A CPU D-bit set or a zap that lands in
/// between is overwritten: the Dirty bit is lost, or a zapped leaf comes back (violating P3).
#[cfg(feature = "broken-plain-store")]
fn broken_plain_clear(
    sptep: &crate::mmu::spte::AtomicSpte,
    old: crate::mmu::spte::Spte,
    mask: u64,
) -> crate::mmu::spte::Spte {
    crate::sync::yield_now();
    // ORDERING: deliberately wrong (see above); Relaxed like the AND it replaces.
    sptep.store(
        crate::mmu::spte::Spte::from_raw(old.raw() & !mask),
        Ordering::Relaxed,
    );
    old
}

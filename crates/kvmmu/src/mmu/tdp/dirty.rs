//! Dirty logging on the TDP MMU: re-arming by write-protection (`kvm_tdp_mmu_clear_dirty_pt_masked`
//! with `wrprot`, `kvm_tdp_mmu_wrprot_slot`) and the fast page fault that undoes it
//! (`fast_page_fault` on a direct root, `Documentation/virt/kvm/locking.rst` "Fast page fault").
//!
//! # Protocol (docs/locking.md "Dirty logging", docs/invariants.md "Dirty logging")
//! - **Re-arm** (`mmu_lock` write + RCU): clears W with one `fetch_and(!W)` on each present leaf
//!   it is asked about, keeping MMU-writable, host-writable, A and D. It never changes the pfn or
//!   bit 11, so it composes with the lockless ager's `fetch_and(!A)` and the CPU's A/D CAS. The
//!   caller flushes remote TLBs before it returns to its user (D1).
//! - **Fast page fault** (RCU only, no `mmu_lock`): a write fault on a present 4K leaf that is
//!   MMU-writable but not writable is fixed by one CAS from the value read to the same value with
//!   W and A set. The CAS compares the whole word, so it fails if a zap, a re-arm, an ager or the
//!   CPU changed the leaf since it was read (no write through a stale pfn: a zapped leaf is
//!   NONPRESENT or, inside an unlinked table, FROZEN, neither of which matches). On failure the
//!   caller takes the slow path (D2). The caller marks the page dirty after a successful CAS and
//!   before the vCPU's write (D3).
//! - **Access-tracking restore** (RCU only; A/D-disabled leaves, spte.rs invariant 6): any fault on
//!   a present 4K leaf marked for access tracking by aging is fixed by the same one CAS, to the
//!   leaf with R/X restored (and, for a write, W if MMU-writable). It races the lockless ager's
//!   own CAS (docs/locking.md "A/D-disabled aging" AD1, AD2): each compares the whole word, so
//!   of two racing changes exactly one lands and the other party retries or gives up.
//!
//! # Huge leaves
//! Enabling logging splits the slot's huge leaves in place first (eager page splitting,
//! `VmConfig::eager_page_split`, `vm/dirty_log.rs`). With it off, a huge leaf is write-protected
//! as a whole here and never fast-fixed: the first write takes the slow path, whose map step
//! splits it in place and installs the 4K leaf.

use crate::addr::{AsId, Gfn, GfnRange, Level};
use crate::mmu::spte::{AtomicSpte, DIRTY_MASK, Spte, WRITABLE_MASK};
use crate::sync::atomic::Ordering;
use crate::sync::rcu::RcuGuard;
use crate::sync::witness::MmuWrite;

use super::iter::TdpIter;
use super::table::GFN_LIMIT;
use super::walk::find_leaf;
use super::{RootRef, TdpMmu};

pub use crate::mmu::types::FastFault;
use crate::mmu::types::fix_fast;

impl TdpMmu {
    /// Clears W on every present leaf of `as_id`'s valid root in `range` whose gfn passes
    /// `wanted` (`kvm_tdp_mmu_clear_dirty_pt_masked` with write-protection); returns true if some
    /// leaf lost W, i.e. remote TLBs must be flushed before the caller's user relies on it (D1).
    /// MMU-writable is kept, so the next write is fixed by [`TdpMmu::fast_page_fault`].
    pub fn write_protect_range(
        &self,
        as_id: AsId,
        range: GfnRange,
        wanted: impl FnMut(Gfn) -> bool,
        mmu: &MmuWrite,
        rcu: &RcuGuard<'_>,
    ) -> bool {
        self.clear_leaf_bit_range(as_id, range, WRITABLE_MASK, wanted, |_| {}, mmu, rcu)
    }

    /// The D-bit re-arm (`kvm_tdp_mmu_clear_dirty_pt_masked` without write-protection, the PML
    /// flavour): clears D on every present leaf in `range` whose gfn passes `wanted`, calling
    /// `dirty` with the first gfn of each leaf whose D this call cleared (from the value the
    /// atomic AND returned, so a D set concurrently is either reported here or left in the
    /// leaf). Returns true if some leaf lost D: TLB entries that cached it must be flushed.
    pub fn clear_dirty_range(
        &self,
        as_id: AsId,
        range: GfnRange,
        wanted: impl FnMut(Gfn) -> bool,
        dirty: impl FnMut(Gfn),
        mmu: &MmuWrite,
        rcu: &RcuGuard<'_>,
    ) -> bool {
        self.clear_leaf_bit_range(as_id, range, DIRTY_MASK, wanted, dirty, mmu, rcu)
    }

    /// Clears `bit` with one atomic AND on the present leaves in `range` that have it and whose
    /// gfn passes `wanted`; `cleared` gets the gfn of each leaf whose bit the AND removed.
    #[allow(clippy::too_many_arguments)]
    fn clear_leaf_bit_range(
        &self,
        as_id: AsId,
        range: GfnRange,
        bit: u64,
        mut wanted: impl FnMut(Gfn) -> bool,
        mut cleared: impl FnMut(Gfn),
        mmu: &MmuWrite,
        rcu: &RcuGuard<'_>,
    ) -> bool {
        self.check_lock(mmu.lock_id());
        self.assert_rcu_domain(rcu);
        let start = range.start().raw();
        let end = range.end().raw().min(GFN_LIMIT);
        if start >= end {
            return false;
        }
        let Some(root) = self.inner.valid_root(as_id) else {
            return false;
        };
        // SAFETY: found through the valid-root slot under `rcu` (P4).
        let root = unsafe { root.get() };
        let mut any = false;
        // SAFETY: the root table stays allocated while `rcu` is pinned (P4).
        let mut it = unsafe { TdpIter::new(root.table, start, end, rcu) };
        while it.valid() {
            let old = it.old();
            let level = it.level();
            if old.is_present_leaf(level) && old.raw() & bit != 0 {
                // A huge leaf (eager splitting off) is handled whole; the first write's fault
                // splits it.
                let gfn = Gfn::new(it.gfn().max(start));
                if level > Level::L4K || wanted(gfn) {
                    let prev = clear_bits(it.sptep(), bit);
                    if prev.raw() & bit != 0 {
                        any = true;
                        cleared(gfn);
                    }
                    it.set_old(prev);
                }
            }
            it.next();
        }
        any
    }

    /// The fast page fault (`fast_page_fault`, direct roots only): for a write fault on `gfn`,
    /// makes a present 4K leaf that is MMU-writable but not writable writable again with one CAS
    /// and no `mmu_lock` (D2). Reads only under `rcu`.
    pub fn fast_page_fault(&self, root: &RootRef, gfn: Gfn, rcu: &RcuGuard<'_>) -> FastFault {
        self.fast_page_fault_access(root, gfn, true, rcu)
    }

    /// The fast page fault for an access to `gfn` (a write if `write`): as
    /// [`TdpMmu::fast_page_fault`], and also restores a 4K leaf marked for access tracking (any
    /// access; the A/D-disabled format). Reads only under `rcu`; one CAS.
    pub fn fast_page_fault_access(
        &self,
        root: &RootRef,
        gfn: Gfn,
        write: bool,
        rcu: &RcuGuard<'_>,
    ) -> FastFault {
        self.assert_walkable(root, rcu, "fast_page_fault");
        if root.is_invalid() || gfn.raw() >= GFN_LIMIT {
            return FastFault::Slow;
        }
        // SAFETY: we hold a reference to `root`, so its table is allocated (P4); the tables below
        // are reached under `rcu` (P1).
        let Some((sptep, old, Level::L4K)) = (unsafe { find_leaf(root.table(), gfn.raw(), rcu) })
        else {
            // Not present, frozen, or a huge leaf: the slow path.
            return FastFault::Slow;
        };
        fix_fast(sptep, old, write)
    }
}

/// Re-arm's one write: `fetch_and(!bit)` (W, or D in the D-bit mode); returns the previous value.
#[inline]
pub(crate) fn clear_bits(sptep: &AtomicSpte, bit: u64) -> Spte {
    // ORDERING: D1 — atomicity keeps a concurrent A/D set or fast-path CAS (the latter then either
    // lands first and is cleared here, or fails); the remote TLB flush that follows orders vCPUs.
    sptep.fetch_and(!bit, Ordering::Relaxed)
}

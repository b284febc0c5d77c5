//! Splitting huge leaves (`tdp_mmu_split_huge_page`, `kvm_tdp_mmu_try_split_huge_pages`), under
//! `mmu_lock` **read**, with one compare-and-swap (P8 in the module doc).
//!
//! A huge leaf is replaced by a link to a new table whose 512 entries are fully populated before
//! it is published: each child inherits the huge leaf's permissions and A/D bits
//! ([`split_child_spte`]) and maps its part of the same frames. The children are built from the
//! exact value the CAS then replaces, so a concurrent Accessed clear (a lockless ager), a
//! hardware A/D set or a fault's permission upgrade on the huge leaf either lands before the read
//! (and is inherited) or makes the CAS fail (and the children are rebuilt from the new value): no
//! A/D update is lost. Every translation the table provides equals the huge leaf's, so no TLB
//! flush is needed for correctness; a vCPU still holding the huge translation writes through
//! it only with Dirty already set (a write through an entry without Dirty re-walks and sets D in
//! the child).

use crate::addr::{AsId, GfnRange, Level};
use crate::mmu::hugepage::split_child_spte;
use crate::mmu::spte::{AtomicSpte, Spte, SpteKind};
use crate::sync::atomic::Ordering;
use crate::sync::rcu::RcuGuard;
use crate::sync::witness::MmuRead;

use super::iter::TdpIter;
use super::table::{ENTRIES, GFN_LIMIT, TablePtr};
use super::{Counters, TdpMmu};

/// Splits the huge leaf last seen as `old` at `level` in `sptep` into a populated table one
/// level down. `Ok(())` once the table is linked; `Err(actual)` if the slot no longer holds a
/// present huge leaf (it was zapped, split or frozen meanwhile: nothing changed). Re-reads and
/// rebuilds while only the leaf's bits change under it (A/D, permission), so it never gives up
/// on a leaf that stays present.
pub(crate) fn split_huge_spte(
    sptep: &AtomicSpte,
    mut old: Spte,
    level: Level,
    counters: &Counters,
) -> Result<(), Spte> {
    let child = TablePtr::alloc();
    Counters::add(&counters.tables_allocated, 1);
    loop {
        if level == Level::L4K || !old.is_present_leaf(level) {
            // SAFETY: never published (P1).
            unsafe { child.free() };
            Counters::add(&counters.tables_freed, 1);
            return Err(old);
        }
        // SAFETY: we own the unpublished table (P1).
        let t = unsafe { child.get() };
        for i in 0..ENTRIES {
            // ORDERING: Relaxed: the table is published by the Release CAS below (O2).
            t.at(i)
                .store(split_child_spte(old, level, i), Ordering::Relaxed);
        }
        // ORDERING: O2 — Release publishes the initialised children with the link; Acquire on
        // failure, as the value read is the next huge leaf to rebuild from (or a table to skip).
        match sptep.compare_exchange(old, child.to_spte(), Ordering::Release, Ordering::Acquire) {
            Ok(_) => {
                let below = level.down().unwrap_or(Level::L4K);
                counters.pages.remove(level, 1);
                counters.pages.install_n(below, ENTRIES as u64);
                counters.not_by_fault(ENTRIES as u64);
                Counters::add(&counters.huge_splits, 1);
                return Ok(());
            }
            Err(actual) => old = actual,
        }
    }
}

/// The gfns `[start, end)` of `range` the TDP MMU can map, or `None` if that is empty.
fn gfn_span(range: GfnRange) -> Option<(u64, u64)> {
    let start = range.start().raw();
    let end = range.end().raw().min(GFN_LIMIT);
    (start < end).then_some((start, end))
}

impl TdpMmu {
    /// Walks the part of `range` the TDP MMU can map in every valid root of `as_id`: `visit` gets
    /// an iterator at the first SPTE and the RCU guard it walks under, pinned for that root alone
    /// and dropped only after `visit` returns (so a `visit` that unlinks tables flushes before the
    /// frees it deferred can run, P6). Does nothing if that part is empty.
    fn for_each_valid_root(
        &self,
        as_id: AsId,
        range: GfnRange,
        mut visit: impl FnMut(&mut TdpIter<'_>, &RcuGuard<'_>),
    ) {
        let Some((start, end)) = gfn_span(range) else {
            return;
        };
        let roots = self.roots_of(Some(as_id));
        for root in roots.iter().filter(|r| !r.is_invalid()) {
            let guard = self.inner.rcu.pin();
            // SAFETY: we hold a reference to `root`, so its table is allocated (P4).
            let mut it = unsafe { TdpIter::new(root.table(), start, end, &guard) };
            visit(&mut it, &guard);
        }
    }

    /// Splits every huge leaf above `target` that maps part of `range` in the roots of `as_id`,
    /// down to `target` (`kvm_tdp_mmu_try_split_huge_pages`, eager page splitting), under
    /// `mmu_lock` read. Returns the number of huge leaves split. Needs no TLB flush (module doc).
    ///
    /// # Panics
    /// If `mmu` guards another `mmu_lock` than the one this MMU is bound to.
    pub fn split_huge_pages(
        &self,
        as_id: AsId,
        range: GfnRange,
        target: Level,
        mmu: &MmuRead,
    ) -> u64 {
        self.check_lock(mmu.lock_id());
        let counters = &self.inner.counters;
        let mut split = 0;
        self.for_each_valid_root(as_id, range, |it, _| {
            while it.valid() {
                let old = it.old();
                // `next` re-reads the slot and steps into the new table (pre-order), so a 1G leaf
                // split into 2M leaves has those split in turn.
                if it.level() > target
                    && old.kind(it.level()) == SpteKind::Leaf
                    && split_huge_spte(it.sptep(), old, it.level(), counters).is_ok()
                {
                    split += 1;
                }
                it.next();
            }
        });
        split
    }
}

impl TdpMmu {
    /// In-place recovery of huge leaves (`kvm_mmu_recover_huge_pages`): every table at 2M or 1G
    /// whose block lies inside `range`, for which `allowed(block_gfn, level)` holds, and whose
    /// entries are all present leaves mapping one contiguous, aligned run of frames with the same
    /// permissions, is replaced by one huge leaf. Runs under `mmu_lock` write (the kernel since
    /// 6.13 does it under read with a frozen exchange; here the exclusive-mode unlink of
    /// `handle_removed_pt` is reused). The huge leaf gets Accessed, and Dirty when writable (a
    /// child's concurrent D set cannot be lost: the leaf is conservatively dirty). Remote TLBs
    /// are flushed once, before the RCU guard that retires the unlinked tables is dropped (P6).
    /// An allowed table with no present entry is unlinked instead (the block then faults huge).
    /// Returns the number of huge leaves formed.
    pub fn recover_huge_pages(
        &self,
        as_id: AsId,
        range: GfnRange,
        allowed: impl Fn(u64, Level) -> bool,
        mmu: &crate::sync::witness::MmuWrite,
        flusher: &dyn crate::mmu::types::RemoteTlbFlush,
    ) -> u64 {
        use crate::geometry::{align_down, pages};
        use crate::mmu::hugepage::max_leaf_level;
        use crate::mmu::spte::{ACCESSED_MASK, BASE_ADDR_MASK, DIRTY_MASK, PAGE_SIZE_MASK};
        self.check_lock(mmu.lock_id());
        let Some((start, end)) = gfn_span(range) else {
            return 0;
        };
        let counters = &self.inner.counters;
        let mut formed = 0;
        self.for_each_valid_root(as_id, range, |it, guard| {
            let mut unlinked = false;
            while it.valid() {
                let level = it.level();
                let old = it.old();
                let base = it.gfn();
                let candidate = level > Level::L4K
                    && level <= max_leaf_level()
                    && old.kind(level) == SpteKind::Table
                    && base >= start
                    && base + pages(level) <= end
                    && allowed(base, level);
                if candidate {
                    let child_level = level.down().unwrap_or(Level::L4K);
                    let child = TablePtr::from_spte(old);
                    // SAFETY: a present non-leaf SPTE read under `guard` (P1).
                    let t = unsafe { child.get() };
                    // ORDERING: Relaxed: under `mmu_lock` write only A/D change concurrently,
                    // and the new leaf does not depend on them (doc above).
                    let first = t.at(0).load(Ordering::Relaxed);
                    let same = |s: Spte| {
                        (s.raw() & !(BASE_ADDR_MASK | ACCESSED_MASK | DIRTY_MASK))
                            == (first.raw() & !(BASE_ADDR_MASK | ACCESSED_MASK | DIRTY_MASK))
                    };
                    let aligned = first.pfn().raw() == align_down(first.pfn().raw(), level);
                    // Children marked for access tracking (A/D-disabled) are left small: the
                    // huge leaf would carry A without R/X (spte.rs invariant 6).
                    let ok = first.is_present_leaf(child_level)
                        && !first.is_access_tracked()
                        && aligned
                        && (0..ENTRIES).all(|i| {
                            // ORDERING: as above.
                            let s = t.at(i).load(Ordering::Relaxed);
                            s.is_present_leaf(child_level)
                                && same(s)
                                && s.pfn().raw()
                                    == first.pfn().raw() + i as u64 * pages(child_level)
                        });
                    // ORDERING: as above.
                    let empty =
                        (0..ENTRIES).all(|i| !t.at(i).load(Ordering::Relaxed).is_shadow_present());
                    if empty {
                        // A table left empty by zaps (e.g. a host collapse's invalidation) would
                        // make the next fault map small: unlink it, so the block faults huge.
                        it.sptep().store(Spte::NONPRESENT, Ordering::Relaxed);
                        it.set_old(Spte::NONPRESENT);
                        // SAFETY: unlinked just now under `mmu_lock` write with `guard` pinned;
                        // handed over once (P1); freed only after the flush below.
                        let _ = unsafe {
                            super::zap::handle_removed_pt(child, child_level, guard, counters)
                        };
                        unlinked = true;
                    } else if ok {
                        let mut raw = first.raw() | PAGE_SIZE_MASK | ACCESSED_MASK;
                        if first.is_writable() {
                            raw |= DIRTY_MASK;
                        }
                        // Without X under the NX huge pages mitigation, as a fault installs it.
                        let huge = counters.pages.nx_adjust(Spte::from_raw(raw), level);
                        // ORDERING: Release, as a fault's install (O2): walkers that Acquire-load
                        // the leaf see the frames' initialisation they saw through the children.
                        it.sptep().store(huge, Ordering::Release);
                        it.set_old(huge);
                        // SAFETY: unlinked just now under `mmu_lock` write with `guard` pinned;
                        // handed over once (P1); freed only after the flush below.
                        let leaves = unsafe {
                            super::zap::handle_removed_pt(child, child_level, guard, counters)
                        };
                        let _ = leaves;
                        counters.pages.install(level);
                        counters.not_by_fault(1);
                        formed += 1;
                        unlinked = true;
                    }
                }
                it.next();
            }
            // P6: flush before the guard that deferred the frees is dropped (it is dropped only
            // after this closure returns).
            if unlinked {
                flusher.flush_remote_tlbs();
            }
        });
        Counters::add(&counters.huge_recovered, formed);
        formed
    }
}

impl TdpMmu {
    /// Turns the NX huge pages mitigation on or off: from now on, huge leaves are installed
    /// without X (`mmu/hugepage.rs`), so an instruction fetch through one faults.
    pub fn set_nx_huge_pages(&self, on: bool) {
        self.inner.counters.pages.set_nx_huge(on);
    }

    /// True if the entry at `level` covering `gfn` links a table in a valid root of `as_id` (a
    /// split of that block is still in place). Lock-free (RCU).
    pub(crate) fn table_at(&self, as_id: AsId, gfn: u64, level: Level) -> bool {
        if gfn >= GFN_LIMIT {
            return false;
        }
        let guard = self.inner.rcu.pin();
        for root in &self.roots_of(Some(as_id)) {
            if root.is_invalid() {
                continue;
            }
            // SAFETY: we hold a reference to `root`, so its table is allocated (P4).
            let mut it = unsafe { TdpIter::new(root.table(), gfn, gfn + 1, &guard) };
            while it.valid() && it.level() >= level {
                if it.level() == level {
                    if it.old().kind(level) == SpteKind::Table {
                        return true;
                    }
                    break;
                }
                it.next();
            }
        }
        false
    }

    /// Unlinks the table at each `(gfn, level)` entry of `blocks` in the valid roots of `as_id`
    /// (`kvm_tdp_mmu_zap_sp` for NX huge page recovery), under `mmu_lock` write: its leaves are
    /// zapped, the block faults huge again. Remote TLBs are flushed once, after the last unlink
    /// and before the RCU guard that retires the tables is dropped (P6). Returns the number of
    /// tables unlinked.
    ///
    /// # Panics
    /// If `mmu` guards another `mmu_lock` than the one this MMU is bound to.
    pub(crate) fn zap_tables_at(
        &self,
        as_id: AsId,
        blocks: &[(u64, Level)],
        mmu: &crate::sync::witness::MmuWrite,
        flusher: &dyn crate::mmu::types::RemoteTlbFlush,
    ) -> u64 {
        self.check_lock(mmu.lock_id());
        let counters = &self.inner.counters;
        let mut zapped = 0;
        let guard = self.inner.rcu.pin();
        for root in &self.roots_of(Some(as_id)) {
            if root.is_invalid() {
                continue;
            }
            for &(gfn, level) in blocks {
                if gfn >= GFN_LIMIT || level == Level::L4K {
                    continue;
                }
                // SAFETY: we hold a reference to `root`, so its table is allocated (P4).
                let mut it = unsafe { TdpIter::new(root.table(), gfn, gfn + 1, &guard) };
                while it.valid() && it.level() >= level {
                    let old = it.old();
                    if it.level() == level {
                        if old.kind(level) == SpteKind::Table {
                            // ORDERING: Relaxed: under `mmu_lock` write no other thread changes
                            // a non-leaf SPTE; walkers that loaded the link keep using the table
                            // until the flush below, and RCU keeps it allocated until `guard`
                            // drops (P1, P6).
                            it.sptep().store(Spte::NONPRESENT, Ordering::Relaxed);
                            // SAFETY: unlinked just now under `mmu_lock` write with `guard`
                            // pinned; handed over once (P1); freed only after the flush below.
                            let _ = unsafe {
                                super::zap::handle_removed_pt(
                                    TablePtr::from_spte(old),
                                    level.down().unwrap_or(Level::L4K),
                                    &guard,
                                    counters,
                                )
                            };
                            zapped += 1;
                        }
                        break;
                    }
                    it.next();
                }
            }
        }
        // P6: flush before the guard that deferred the frees is dropped.
        if zapped != 0 {
            flusher.flush_remote_tlbs();
        }
        drop(guard);
        zapped
    }
}

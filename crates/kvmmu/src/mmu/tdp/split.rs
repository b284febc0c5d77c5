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
use crate::sync::atomic::{AtomicU64, Ordering};
use crate::sync::rcu::RcuGuard;
use crate::sync::witness::MmuRead;

use super::iter::TdpIter;
use super::table::{ENTRIES, GFN_LIMIT, TablePtr};
use super::{Counters, RootRef, TdpMmu};
use crate::mmu::owner;

/// Splits the huge leaf last seen as `old` at `level` in `sptep` into a populated table one
/// level down. `Ok(())` once the table is linked; `Err(actual)` if the slot no longer holds a
/// present huge leaf (it was zapped, split or frozen meanwhile: nothing changed). Re-reads and
/// rebuilds while only the leaf's bits change under it (A/D, permission), so it never gives up
/// on a leaf that stays present.
///
/// Also records the children's owner words (G3, G4) when `owner`, the word beside `sptep`, names
/// the huge leaf (its pfn bits match): child `k` gets the huge leaf's claim for its own frames
/// (host page `hp + k * pages`, first pfn `pfn + k * pages`), so the split changes no claim a
/// vCPU's fill can act on. Otherwise (or with `owner` `None`) the children record unknown (0).
pub(crate) fn split_huge_spte_owned(
    sptep: &AtomicSpte,
    owner: Option<&AtomicU64>,
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
        // ORDERING: Relaxed: `old` was loaded with Acquire (O1), which makes the word stored
        // before the huge leaf's Release install visible (G3); a later word for another leaf is
        // told apart by its pfn bits.
        let base = old.pfn().raw();
        let hp =
            owner.and_then(|w| owner::expected_host_page(w.load(Ordering::Relaxed), base, base));
        let step = level.down().map_or(1, crate::geometry::pages);
        // SAFETY: we own the unpublished table (P1).
        let owners = unsafe { child.owners() };
        for i in 0..ENTRIES as u64 {
            let word = hp.map_or(0, |hp| owner::encode(hp + i * step, base + i * step));
            // ORDERING: Relaxed: published with the children by the Release CAS below (G3).
            owners.at(i as usize).store(word, Ordering::Relaxed);
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
    /// the root, an iterator at the first SPTE and the RCU guard it walks under, pinned for that root alone
    /// and dropped only after `visit` returns (so a `visit` that unlinks tables flushes before the
    /// frees it deferred can run, P6). Does nothing if that part is empty.
    fn for_each_valid_root(
        &self,
        as_id: AsId,
        range: GfnRange,
        mut visit: impl FnMut(&RootRef, &mut TdpIter<'_>, &RcuGuard<'_>),
    ) {
        let Some((start, end)) = gfn_span(range) else {
            return;
        };
        let roots = self.roots_of(Some(as_id));
        for root in roots.iter().filter(|r| !r.is_invalid()) {
            let guard = self.inner.rcu.pin();
            // SAFETY: we hold a reference to `root`, so its table is allocated (P4).
            let mut it = unsafe { TdpIter::new(root.table(), start, end, &guard) };
            visit(root, &mut it, &guard);
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
        self.for_each_valid_root(as_id, range, |root, it, guard| {
            while it.valid() {
                let old = it.old();
                // `next` re-reads the slot and steps into the new table (pre-order), so a 1G leaf
                // split into 2M leaves has those split in turn.
                if it.level() > target && old.kind(it.level()) == SpteKind::Leaf && {
                    // SAFETY: we hold a reference to `root` (P4); tables below under `guard`.
                    let owner = unsafe {
                        super::walk::owner_word(
                            root.table(),
                            it.gfn(),
                            it.level(),
                            it.sptep(),
                            guard,
                        )
                    };
                    split_huge_spte_owned(it.sptep(), owner, old, it.level(), counters).is_ok()
                } {
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
        self.for_each_valid_root(as_id, range, |root, it, guard| {
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
                        // The huge leaf's owner word (G3): the children's claims, if every child
                        // recorded one and they form one run (child `i`: host page `hp + i *
                        // pages`), are exactly the huge leaf's; otherwise unknown (0). Written
                        // even when unknown, so no word of an earlier leaf in this slot survives.
                        // SAFETY: as `t` above.
                        let child_owners = unsafe { child.owners() };
                        let base_pfn = first.pfn().raw();
                        let word = owner::recovered(
                            ENTRIES,
                            pages(child_level),
                            base_pfn,
                            // ORDERING: Relaxed: under `mmu_lock` write no install races us;
                            // each word was published with its child's leaf, read above.
                            |i| child_owners.at(i).load(Ordering::Relaxed),
                        );
                        // SAFETY: we hold a reference to `root` (P4); tables below under `guard`.
                        let slot = unsafe {
                            super::walk::owner_word(root.table(), base, level, it.sptep(), guard)
                        };
                        if let Some(slot) = slot {
                            // ORDERING: Relaxed: published by the leaf's Release store below (G3).
                            slot.store(word, Ordering::Relaxed);
                        }
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

#[cfg(all(test, not(loom)))]
mod tests {
    use super::super::{RootRef, TdpMmu};
    use crate::addr::{AsId, Gfn, GfnRange, Level, Pfn};
    use crate::mmu::types::{FaultOutcome, HwWalk, MapRequest, RemoteTlbFlush};
    use crate::sync::Arc;
    use crate::sync::rcu::Rcu;
    use crate::sync::witness::MmuLock;

    /// No vCPUs: nothing to shoot down.
    struct NoVcpus;
    impl RemoteTlbFlush for NoVcpus {
        fn flush_remote_tlbs(&self) {}
    }

    /// Host page of gfn `g` (memslot base 0x4000_0000 >> 12), and its frame.
    const HP: u64 = 0x40_000;
    const PFN: u64 = 0x2000;

    /// A TDP MMU with one 2M leaf at gfns 0..512 (frames `PFN..`), installed by a fault that
    /// recorded its owner (`Some(HP + 5)` for gfn 5) or none.
    fn huge(owner: bool) -> (Arc<Rcu>, MmuLock, TdpMmu, RootRef) {
        let rcu = Arc::new(Rcu::new());
        let lock = MmuLock::new();
        let tdp = TdpMmu::new(1, Arc::clone(&rcu));
        let root = {
            let mmu = lock.read();
            let root = tdp.get_root(AsId::new(0), mmu.witness());
            let guard = rcu.pin();
            let req = MapRequest {
                gfn: Gfn::new(5),
                pfn: Pfn::new(PFN + 5),
                level: Level::L2M,
                host_writable: true,
                write_fault: false,
                prefetch: false,
            };
            let hp = owner.then_some(HP + 5);
            assert_eq!(
                tdp.map_owned(&root, &req, hp, mmu.witness(), &guard),
                FaultOutcome::Fixed
            );
            root
        };
        (rcu, lock, tdp, root)
    }

    /// What a vCPU's fill of gfn `g` would be told: the leaf's level and the expected host page.
    fn fill(tdp: &TdpMmu, root: &RootRef, g: u64) -> (Level, Option<u64>) {
        // SAFETY: single-threaded test: nothing unlinks a table during the walk.
        let (hit, owner) = unsafe { tdp.guest_walk(root, Gfn::new(g), false) };
        let HwWalk::Hit { pfn, level, .. } = hit else {
            panic!("gfn {g} is mapped");
        };
        assert_eq!(pfn.raw(), PFN + g, "gfn {g} maps its own frame");
        (level, owner)
    }

    fn whole() -> GfnRange {
        GfnRange::new(Gfn::new(0), Gfn::new(512)).expect("a non-empty range")
    }

    #[test]
    fn split_children_and_a_recovered_leaf_keep_the_huge_leafs_recorded_owner() {
        let (_rcu, lock, tdp, root) = huge(true);
        assert_eq!(fill(&tdp, &root, 7), (Level::L2M, Some(HP + 7)));
        let mmu = lock.read();
        assert_eq!(
            tdp.split_huge_pages(AsId::new(0), whole(), Level::L4K, mmu.witness()),
            1
        );
        drop(mmu);
        for g in [0, 1, 7, 255, 511] {
            assert_eq!(
                fill(&tdp, &root, g),
                (Level::L4K, Some(HP + g)),
                "split child {g} records the huge leaf's claim for its frame"
            );
        }
        let mmu = lock.write();
        let formed =
            tdp.recover_huge_pages(AsId::new(0), whole(), |_, _| true, mmu.witness(), &NoVcpus);
        drop(mmu);
        assert_eq!(formed, 1);
        for g in [0, 9, 511] {
            assert_eq!(
                fill(&tdp, &root, g),
                (Level::L2M, Some(HP + g)),
                "the recovered leaf records the children's run"
            );
        }
    }

    #[test]
    fn a_huge_leaf_without_an_owner_splits_and_recovers_into_leaves_without_one() {
        let (_rcu, lock, tdp, root) = huge(false);
        assert_eq!(fill(&tdp, &root, 3), (Level::L2M, None));
        let mmu = lock.read();
        assert_eq!(
            tdp.split_huge_pages(AsId::new(0), whole(), Level::L4K, mmu.witness()),
            1
        );
        drop(mmu);
        assert_eq!(fill(&tdp, &root, 3), (Level::L4K, None));
        let mmu = lock.write();
        let formed =
            tdp.recover_huge_pages(AsId::new(0), whole(), |_, _| true, mmu.witness(), &NoVcpus);
        drop(mmu);
        assert_eq!(formed, 1);
        assert_eq!(fill(&tdp, &root, 3), (Level::L2M, None));
    }

    #[test]
    fn a_fault_that_splits_a_huge_leaf_on_its_way_down_gives_the_children_its_claim() {
        let (rcu, lock, tdp, root) = huge(true);
        // A 4K fault (dirty logging wants small leaves) on gfn 9 of the owned 2M leaf: the map
        // splits the leaf in place, then finds gfn 9's child already present (spurious).
        let mmu = lock.read();
        let guard = rcu.pin();
        let req = MapRequest {
            gfn: Gfn::new(9),
            pfn: Pfn::new(PFN + 9),
            level: Level::L4K,
            host_writable: true,
            write_fault: false,
            prefetch: false,
        };
        let _ = tdp.map_owned(&root, &req, Some(HP + 9), mmu.witness(), &guard);
        drop(guard);
        drop(mmu);
        for g in [0, 8, 10, 511] {
            assert_eq!(
                fill(&tdp, &root, g),
                (Level::L4K, Some(HP + g)),
                "child {g} of the fault's split keeps the huge leaf's claim for its frame"
            );
        }
    }
}

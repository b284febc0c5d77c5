//! The shadow MMU's map step (`direct_map`, `mmu_set_spte`, `__rmap_add`): the protocol is in the
//! module documentation of [`super`] (S1–S7).

use crate::addr::{Gfn, Level};
use crate::geometry::{GFN_LIMIT, index};
use crate::mmu::hugepage::{leaf_pfn, max_leaf_level};
use crate::mmu::spte::{
    ACCESSED_MASK, AtomicSpte, DIRTY_MASK, LeafAttrs, Spte, SpteKind, make_spte_ad,
    resolve_access_tracked,
};
use crate::mmu::types::{FaultOutcome, MapRequest, RemoteTlbFlush, RetryReason};
use crate::sync::atomic::Ordering;
use crate::sync::witness::MmuWrite;

use super::mmu::{ShadowMmu, ShadowRoot, add};
use super::page::{Role, SpPtr};
use super::rmap::{RMAP_RECYCLE_THRESHOLD, RmapHead};
use super::slot_rmaps::SlotRmaps;

impl ShadowMmu {
    /// Resolves one fault by installing a leaf of at most `req.level` (lower where a shadow page
    /// is in place) for `req.gfn` → `req.pfn` under `root`
    /// (`direct_map` / `kvm_mmu_get_child_sp` / `mmu_set_spte`), linking missing shadow pages
    /// and adding the leaf to its rmap in `rmaps` (the memslot's arrays). Rmaps past
    /// [`RMAP_RECYCLE_THRESHOLD`] are zapped and flushed (`__rmap_add`).
    ///
    /// # Panics
    /// If the gfn is mapped to another pfn (spec §4 item 13: the notifier must zap first), if
    /// `root` belongs to another MMU.
    pub fn map(
        &self,
        root: &ShadowRoot,
        req: &MapRequest,
        rmaps: &SlotRmaps,
        mmu: &MmuWrite,
        flush: &impl RemoteTlbFlush,
    ) -> FaultOutcome {
        self.map_owned(root, req, None, rmaps, mmu, flush)
    }

    /// [`ShadowMmu::map`], recording beside a newly installed leaf the host page (`hva >> 12`)
    /// that `req.pfn` backs (`host_page`, from the fault's GUP), so that a vCPU's guest-mode fill
    /// of the leaf can check its frame without SRCU or the memslots (G5 in docs/locking.md;
    /// `None` records "unknown", and those fills check the memslots).
    ///
    /// # Panics
    /// As [`ShadowMmu::map`].
    pub fn map_owned(
        &self,
        root: &ShadowRoot,
        req: &MapRequest,
        host_page: Option<u64>,
        rmaps: &SlotRmaps,
        mmu: &MmuWrite,
        flush: &impl RemoteTlbFlush,
    ) -> FaultOutcome {
        assert!(
            root.belongs_to(self),
            "map: the root belongs to another ShadowMmu"
        );
        self.check_lock(mmu.lock_id());
        add(&self.inner.counters.faults, 1);
        if root.is_invalid() {
            return FaultOutcome::Retry(RetryReason::InvalidRoot);
        }
        let gfn = req.gfn.raw();
        if gfn >= GFN_LIMIT {
            return FaultOutcome::OutOfRange;
        }
        let stats = &self.inner.rmap_stats;
        let mut target = req.level.min(max_leaf_level());
        let mut state = self.inner.state.lock();
        let mut sp = root.sp;
        loop {
            // SAFETY: `sp` is the root we hold a reference to, or a page linked from a present
            // non-leaf SPTE; we hold `mmu_lock` write, so no page is freed meanwhile (S1).
            let page = unsafe { sp.get() };
            let level = page.role.level;
            let sptep = page.entry(gfn);
            // ORDERING: non-leaf SPTEs change only under `mmu_lock` write, which we hold.
            let mut old = sptep.load(Ordering::Relaxed);
            let mut kind = old.kind(level);
            if kind == SpteKind::Leaf && level > target {
                // A huge leaf where the fault wants a smaller one (dirty logging): drop it
                // (`drop_large_spte`: zap its rmap and flush), then link a page below.
                if let Some(r) = rmaps.get(Gfn::new(gfn), level)
                    && self.zap_rmap(r, level, mmu)
                {
                    flush.flush_remote_tlbs();
                }
                // ORDERING: as above.
                old = sptep.load(Ordering::Relaxed);
                kind = old.kind(level);
            }
            if level == target || kind == SpteKind::Leaf {
                if kind != SpteKind::Table {
                    let Some(rmap) = rmaps.get(req.gfn, level) else {
                        panic!(
                            "kvmmu bug: map of gfn {gfn:#x} with the rmaps of a memslot not covering it"
                        );
                    };
                    return self.set_leaf(sp, req, host_page, level, old, rmap, mmu, flush);
                }
                // A shadow page where the huge leaf would go: serve the fault below it.
                target = level.down().unwrap_or(Level::L4K);
            }
            let Some(child_level) = level.down() else {
                unreachable!("a 4K shadow SPTE is a leaf or non-present (S2)")
            };
            sp = match kind {
                SpteKind::Table => SpPtr::from_spte(old),
                SpteKind::NonPresent => {
                    let role = Role {
                        level: child_level,
                        as_id: page.role.as_id,
                        direct: true,
                    };
                    let base = gfn & !(level.pages() - 1);
                    let child = match state.hash.get(&(base, role)) {
                        Some(&c) => c,
                        None => self.alloc_page(&mut state, base, role, 0),
                    };
                    // ORDERING: Release publishes the child's initialised SPTEs to a vCPU's
                    // Acquire walk (spte.rs O2).
                    sptep.store(child.to_spte(), Ordering::Release);
                    // SAFETY: `page` is live under `mmu_lock` write; its entry leaves the parent
                    // list before `page` is freed (S1, prepare-zap unlinks children first).
                    let pte = unsafe { super::rmap::SptePtr::from_spte(sptep) };
                    // SAFETY: `child` is live: just allocated or found in the hash (S1).
                    let _ = unsafe { child.get() }
                        .parent_ptes
                        .pte_list_add(mmu, stats, pte);
                    child
                }
                SpteKind::Leaf | SpteKind::Frozen => panic!(
                    "kvmmu bug: {old:?} at level {level:?} for gfn {gfn:#x}: the shadow MMU \
                     never freezes (S2)"
                ),
            };
        }
    }

    /// The last step of [`ShadowMmu::map`]: install or upgrade the leaf in `sp`.
    #[allow(clippy::too_many_arguments)]
    fn set_leaf(
        &self,
        sp: SpPtr,
        req: &MapRequest,
        host_page: Option<u64>,
        level: Level,
        old: Spte,
        rmap: &RmapHead,
        mmu: &MmuWrite,
        flush: &impl RemoteTlbFlush,
    ) -> FaultOutcome {
        let gfn = req.gfn.raw();
        // SAFETY: `mmu_lock` write keeps the page allocated (S1).
        let page = unsafe { sp.get() };
        let sptep = page.entry(gfn);
        let attrs = LeafAttrs {
            host_writable: req.host_writable,
            write_allowed: req.write_fault,
            prefetch: req.prefetch,
        };
        let pfn = leaf_pfn(gfn, req.pfn, level);
        let new = self
            .inner
            .pages
            .nx_adjust(make_spte_ad(pfn, level, attrs, self.inner.ad_bits), level);
        match old.kind(level) {
            SpteKind::Leaf => {
                assert_eq!(
                    old.pfn(),
                    pfn,
                    "gfn {gfn:#x} is mapped to another pfn: a present leaf may not change pfn \
                     (spec §4 item 13)"
                );
                if old.is_access_tracked() {
                    // Marked for access tracking by aging: restore it (or install the writable
                    // leaf a write fault asks for) with one CAS; a lockless ager or fast fix
                    // changing it meanwhile makes the CAS fail, and the vCPU retries.
                    let want = resolve_access_tracked(old, new);
                    // ORDERING: Release as for a new leaf (its R/X come back).
                    return match sptep.compare_exchange(
                        old,
                        want,
                        Ordering::Release,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => FaultOutcome::Fixed,
                        Err(_) => FaultOutcome::Retry(RetryReason::CasLost),
                    };
                }
                upgrade_leaf(sptep, old, new, req.write_fault)
            }
            SpteKind::NonPresent => {
                // The owner word beside the leaf (G5), written even when unknown so that no word
                // of an earlier leaf in this slot survives. (A present leaf keeps its pfn, P3, so
                // the upgrades above keep the word of their own install.)
                if let Some(word) = page.owner_word(index(gfn, level)) {
                    let offset = gfn - crate::geometry::align_down(gfn, level);
                    // ORDERING: Relaxed: published by the leaf's Release store below, which a
                    // vCPU's Acquire load of the leaf pairs with (G5); under `mmu_lock` write no
                    // other install writes this word.
                    word.store(
                        crate::mmu::owner::for_leaf(host_page, offset, pfn.raw()),
                        Ordering::Relaxed,
                    );
                }
                // ORDERING: Release, so a vCPU that Acquire-loads the leaf sees what we saw before
                // installing it (the host's initialisation of the frame, via GUP) and the owner
                // word above.
                sptep.store(new, Ordering::Release);
                add(&self.inner.counters.leaves_installed, 1);
                self.inner.pages.install(level);
                // SAFETY: the page is live; the entry leaves the rmap before the page is freed (S1).
                let pte = unsafe { sp.leaf_sptep(index(gfn, level)) };
                let before = rmap.rmap_add(mmu, &self.inner.rmap_stats, pte);
                if before > RMAP_RECYCLE_THRESHOLD {
                    self.zap_rmap(rmap, level, mmu);
                    add(&self.inner.counters.rmap_recycles, 1);
                    flush.flush_remote_tlbs();
                }
                FaultOutcome::Fixed
            }
            SpteKind::Table | SpteKind::Frozen => {
                unreachable!("the map walk stops only at a leaf or a non-present SPTE (S2)")
            }
        }
    }
}

/// The fault on a present leaf for the same frame: a write fault that `new` allows but `old`
/// does not upgrades the leaf to writable, keeping the A/D bits the CPU may be setting
/// concurrently (O5); anything else is spurious. Under `mmu_lock` write, so only A/D change.
pub(super) fn upgrade_leaf(
    sptep: &AtomicSpte,
    old: Spte,
    new: Spte,
    write_fault: bool,
) -> FaultOutcome {
    if !write_fault || old.is_writable() || !new.is_writable() {
        return FaultOutcome::Spurious;
    }
    let mut cur = old;
    loop {
        let want = Spte::from_raw(new.raw() | (cur.raw() & (ACCESSED_MASK | DIRTY_MASK)));
        // ORDERING: Release as for a new leaf; on failure re-read (only A/D change).
        match sptep.compare_exchange(cur, want, Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return FaultOutcome::Fixed,
            Err(actual) => cur = actual,
        }
    }
}

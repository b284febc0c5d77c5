//! Shadow zaps: through rmaps (`kvm_zap_rmap`, `__kvm_rmap_zap_gfn_range`) and by page
//! (prepare-zap / commit-zap, `kvm_mmu_zap_all`); the protocol is in [`super`] (S1, S3, S6).

use crate::addr::{Gfn, GfnRange, Level};
use crate::geometry::{ENTRIES, ROOT_LEVEL};
use crate::mmu::spte::{SHADOW_NONPRESENT_VALUE, Spte, SpteKind};
use crate::mmu::types::{RemoteTlbFlush, ZapBatch};
use crate::sync::Arc;
use crate::sync::atomic::{Ordering, fence};
use crate::sync::witness::{MmuWrite, MmuWriteGuard};

use super::mmu::{RmapLookup, ShadowMmu, State, add};
use super::page::SpPtr;
use super::rmap::RmapHead;
use super::slot_rmaps::{RMAP_LEVELS, SlotRmaps};

/// Pages queued by prepare-zap, freed by commit-zap after a remote TLB flush (S1).
#[derive(Default)]
pub(super) struct InvalidList(pub(super) Vec<SpPtr>);

impl ShadowMmu {
    /// Zaps every SPTE of one rmap of `level` (`kvm_zap_rmap`); true if any was zapped.
    pub(super) fn zap_rmap(&self, rmap: &RmapHead, level: Level, mmu: &MmuWrite) -> bool {
        let c = &self.inner.counters;
        rmap.zap_all(mmu, &self.inner.rmap_stats, |p| {
            let old = Spte::from_raw(p.zap(SHADOW_NONPRESENT_VALUE));
            if old.is_shadow_present() {
                add(&c.leaves_zapped, 1);
                self.inner.pages.remove(level, 1);
                if old.is_dirty() {
                    add(&c.dirty_leaves_zapped, 1);
                }
            }
        })
    }

    /// [`ShadowMmu::zap_rmap`] for the dispatcher (nested: L1 mappings of a newly tracked table).
    pub(crate) fn zap_rmap_pub(&self, rmap: &RmapHead, level: Level, mmu: &MmuWrite) -> bool {
        self.check_lock(mmu.lock_id());
        self.zap_rmap(rmap, level, mmu)
    }

    /// Zaps every leaf of `gfns` through the slot's rmaps (`__kvm_rmap_zap_gfn_range`, levels
    /// 4K..1G). Returns true if the caller must flush remote TLBs before dropping `mmu_lock`.
    ///
    /// With `may_block`, it yields `mmu_lock` when another thread waits for it
    /// (`__walk_slot_rmaps`), flushing first if it zapped anything since the last flush, so no
    /// stale translation survives a yield (spec §3.6, §3.10). Callers must tolerate the yield:
    /// the range is covered by an invalidation in progress or belongs to an INVALID memslot, so
    /// no fault installs into it meanwhile.
    pub fn zap_gfn_range(
        &self,
        rmaps: &SlotRmaps,
        gfns: GfnRange,
        mmu: &mut MmuWriteGuard<'_>,
        may_block: bool,
        flusher: &impl RemoteTlbFlush,
    ) -> bool {
        /// Rmaps visited between two checks for a waiter.
        const RESCHED_EVERY: u32 = 64;
        self.check_lock(mmu.witness().lock_id());
        let mut flush = false;
        let mut since_check = 0u32;
        for level in RMAP_LEVELS {
            let mut g = gfns.start().align_down(level).raw();
            while g < gfns.end().raw() {
                if let Some(r) = rmaps.get(Gfn::new(g), level)
                    && !r.is_empty()
                {
                    flush |= self.zap_rmap(r, level, mmu.witness());
                }
                g += level.pages();
                since_check += 1;
                if may_block && since_check >= RESCHED_EVERY {
                    since_check = 0;
                    if mmu.is_contended() {
                        if flush {
                            flusher.flush_remote_tlbs();
                            flush = false;
                        }
                        mmu.cond_resched();
                    }
                }
            }
        }
        flush
    }

    /// Prepare-zap (`kvm_mmu_prepare_zap_page`): zaps `sp`'s leaves (removing them from their
    /// rmaps), unlinks and recursively prepare-zaps its children, unlinks it from its parents,
    /// marks it invalid and takes it off the hash. Non-root pages (and a root whose last
    /// reference was the MMU's) are queued on `invalid` for [`ShadowMmu::commit_zap`].
    pub(super) fn prepare_zap(
        &self,
        state: &mut State,
        sp: SpPtr,
        sets: &(impl RmapLookup + ?Sized),
        mmu: &MmuWrite,
        invalid: &mut InvalidList,
    ) {
        let stats = &self.inner.rmap_stats;
        // SAFETY: `mmu_lock` write; `sp` is live (S1).
        let page = unsafe { sp.get() };
        if page.is_invalid() {
            return;
        }
        for i in 0..ENTRIES {
            let _ = self.zap_spte(state, sp, i, sets, mmu, invalid);
        }
        // Unlink from the parents (`kvm_mmu_unlink_parents`): clear every SPTE pointing here.
        let _ = page.parent_ptes.zap_all(mmu, stats, |p| {
            let _ = p.zap(SHADOW_NONPRESENT_VALUE);
        });
        // ORDERING: see `ShadowPage::is_invalid`; the Release decrement below publishes it to the
        // last root-reference holder.
        page.invalid.store(true, Ordering::Relaxed);
        state.hash.remove(&(page.gfn, page.role));
        if !page.role.direct {
            // ORDERING: as in `alloc_page`.
            self.inner
                .indirect_shadow_pages
                .fetch_sub(1, Ordering::Relaxed);
            self.track_gfn(page.gfn, false);
        }
        if page.role.level == ROOT_LEVEL {
            let as_idx = page.role.as_id.index();
            if state.roots.get(as_idx).copied().flatten() == Some(sp) {
                state.roots[as_idx] = None;
            }
            // Drop the MMU's own reference last: after it, a vCPU may free the root (S3).
            // ORDERING: as in `Inner::put_root`.
            if page.root_count.fetch_sub(1, Ordering::Release) == 1 {
                fence(Ordering::Acquire);
                invalid.0.push(sp);
            }
        } else {
            invalid.0.push(sp);
        }
    }

    /// Zaps SPTE `i` of page `sp` (`mmu_page_zap_pte`): a leaf is cleared, then leaves its rmap; a
    /// link leaves the child's parent list, and a child left without parents is prepare-zapped
    /// onto `invalid`. True if something present was zapped (the caller flushes before dropping
    /// `mmu_lock`).
    pub(super) fn zap_spte(
        &self,
        state: &mut State,
        sp: SpPtr,
        i: usize,
        sets: &(impl RmapLookup + ?Sized),
        mmu: &MmuWrite,
        invalid: &mut InvalidList,
    ) -> bool {
        let stats = &self.inner.rmap_stats;
        // SAFETY: `mmu_lock` write; `sp` is live (S1).
        let page = unsafe { sp.get() };
        let level = page.role.level;
        let sptep = page.at(i);
        // ORDERING: under `mmu_lock` write, non-leaf SPTEs are ours; a leaf is swapped below.
        let cur = sptep.load(Ordering::Relaxed);
        match cur.kind(level) {
            SpteKind::NonPresent => false,
            SpteKind::Leaf => {
                // Clear first, then remove from the rmap (spec §3.9: lockless readers may see
                // present → non-present, never the reverse).
                // ORDERING: atomic swap keeps a concurrent Dirty set by the CPU (item 19).
                let old = sptep.swap(Spte::NONPRESENT, Ordering::Relaxed);
                self.leaf_zapped(old, level);
                let (as_id, gfn) = (page.role.as_id, page.leaf_gfn(i));
                let Some(rmap) = sets.leaf_rmap(as_id, gfn, level) else {
                    panic!(
                        "kvmmu bug: a shadow leaf for gfn {gfn:?} of {as_id:?} has no memslot rmap (S6)"
                    );
                };
                // SAFETY: the page is live; this is the pointer the fault added (S1).
                let pte = unsafe { sp.leaf_sptep(i) };
                if let Err(e) = rmap.pte_list_remove(mmu, stats, pte) {
                    panic!("kvmmu bug: shadow leaf not in its rmap: {e} (S6)");
                }
                true
            }
            SpteKind::Table => {
                let child = SpPtr::from_spte(cur);
                // ORDERING: vCPUs that still walk through the old link are covered by the
                // caller's flush (commit-zap's, S2); nothing is published.
                sptep.store(Spte::NONPRESENT, Ordering::Relaxed);
                // SAFETY: linked from a present SPTE under `mmu_lock` write: live (S1).
                let cpage = unsafe { child.get() };
                // SAFETY: `page` is live; this is the pointer the link added.
                let pte = unsafe { sp.sptep(i) };
                if let Err(e) = cpage.parent_ptes.pte_list_remove(mmu, stats, pte) {
                    panic!("kvmmu bug: parent SPTE not in its child's parent list: {e} (S2)");
                }
                if cpage.parent_ptes.is_empty() {
                    self.prepare_zap(state, child, sets, mmu, invalid);
                }
                true
            }
            SpteKind::Frozen => unreachable!("the shadow MMU never freezes SPTEs (S2)"),
        }
    }

    /// Counts a zapped leaf `old` at `level`.
    pub(super) fn leaf_zapped(&self, old: Spte, level: Level) {
        let c = &self.inner.counters;
        add(&c.leaves_zapped, 1);
        self.inner.pages.remove(level, 1);
        if old.is_dirty() {
            add(&c.dirty_leaves_zapped, 1);
        }
    }

    /// Commit-zap (`kvm_mmu_commit_zap_page`), as a batch: committing it flushes remote TLBs,
    /// then frees the queued pages (S1).
    pub(super) fn commit_zap(&self, invalid: InvalidList) -> ZapBatch {
        let mut batch = ZapBatch::empty();
        if invalid.0.is_empty() {
            return batch;
        }
        let inner = Arc::clone(&self.inner);
        batch.free_after_flush(move || {
            let c = &inner.counters;
            for sp in invalid.0 {
                // SAFETY: prepare-zap made the page unreachable from every root, parent, hash and
                // rmap; nothing but this batch refers to it, so it is live until freed here.
                let is_root = unsafe { sp.get() }.role.level == ROOT_LEVEL;
                // Prepare-zap emptied the page, removed its SPTEs from every rmap and unlinked it
                // from its parents, the hash and the root table; `ZapBatch::commit` runs this only
                // after its flush waited for every vCPU in guest mode to pass an instruction
                // boundary, so no walker is inside it (S1).
                // SAFETY: unreachable and flushed, as above; freed once (each closure runs once).
                unsafe { sp.free() };
                add(&c.pages_freed, 1);
                if is_root {
                    add(&c.roots_freed, 1);
                }
            }
        });
        batch
    }

    /// Zaps every shadow page (`kvm_mmu_zap_all`): roots are invalidated (vCPUs reload), every
    /// leaf leaves its rmap; the returned batch, committed before `mmu_lock` is dropped, frees the
    /// pages after one remote TLB flush. `sets` are the current memslot sets, one per address
    /// space, read under SRCU.
    pub(crate) fn zap_all(&self, sets: &(impl RmapLookup + ?Sized), mmu: &MmuWrite) -> ZapBatch {
        self.check_lock(mmu.lock_id());
        let mut invalid = InvalidList::default();
        {
            let mut state = self.inner.state.lock();
            let roots: Vec<SpPtr> = state.roots.iter().flatten().copied().collect();
            for sp in roots {
                self.prepare_zap(&mut state, sp, sets, mmu, &mut invalid);
            }
            // Pages not reachable from a valid root (none are expected with direct pages).
            let rest: Vec<SpPtr> = state.hash.values().copied().collect();
            for sp in rest {
                self.prepare_zap(&mut state, sp, sets, mmu, &mut invalid);
            }
        }
        self.commit_zap(invalid)
    }
}

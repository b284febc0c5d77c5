//! Huge leaves in the shadow MMU: making a range map at most a given level
//! (`shadow_mmu_try_split_huge_pages`'s effect). Under `mmu_lock` write the huge leaves above the
//! target level are dropped through their rmaps (`drop_large_spte`), with a remote TLB flush
//! before `mmu_lock` is released; the next fault maps the range at the level its memslot and host
//! then allow (dirty logging: 4K). The guest's data is in the host frames and stays.
//!
//! Recovery ([`ShadowMmu::recover_huge_in_place`]) goes the other way under `mmu_lock` write:
//! a shadow page whose leaves map one aligned, contiguous run is prepare-zapped and its parent
//! SPTE becomes the huge leaf, all pages of one call freed after one remote TLB flush. The NX
//! huge pages hooks (`table_at`, `zap_pages_at`) serve `mmu/nx_huge.rs`.

use crate::addr::{Gfn, GfnRange, Level};
use crate::sync::witness::MmuWrite;

use super::mmu::ShadowMmu;
use super::slot_rmaps::{RMAP_LEVELS, SlotRmaps};

impl ShadowMmu {
    /// Drops every huge leaf above `target` mapping part of `gfns` in one slot (start rounded
    /// down per level, like aging, so a huge leaf straddling the start is not missed). Returns
    /// the number of huge rmaps that held a leaf; a non-zero result means remote TLBs must be
    /// flushed before `mmu_lock` is dropped.
    pub fn drop_huge_leaves(
        &self,
        rmaps: &SlotRmaps,
        gfns: GfnRange,
        target: Level,
        mmu: &MmuWrite,
    ) -> u64 {
        self.check_lock(mmu.lock_id());
        let mut dropped = 0;
        for level in RMAP_LEVELS.into_iter().filter(|l| *l > target) {
            let mut g = gfns.start().align_down(level).raw();
            while g < gfns.end().raw() {
                if let Some(r) = rmaps.get(Gfn::new(g), level)
                    && !r.is_empty()
                    && self.zap_rmap(r, level, mmu)
                {
                    dropped += 1;
                }
                g += level.pages();
            }
        }
        dropped
    }
}

/// The rmaps of one memslot as an [`RmapLookup`](super::mmu::RmapLookup) (recovery works on one
/// slot, and every leaf it zaps is inside it).
struct OneSlot<'a> {
    as_id: crate::addr::AsId,
    rmaps: &'a SlotRmaps,
}

impl super::mmu::RmapLookup for OneSlot<'_> {
    fn leaf_rmap(
        &self,
        as_id: crate::addr::AsId,
        gfn: Gfn,
        level: Level,
    ) -> Option<&super::rmap::RmapHead> {
        if as_id == self.as_id {
            self.rmaps.get(gfn, level)
        } else {
            None
        }
    }
}

impl ShadowMmu {
    /// In-place recovery of huge leaves for the shadow MMU (as the TDP MMU's
    /// `recover_huge_pages`; the kernel's shadow MMU only zaps, `kvm_rmap_zap_collapsible_sptes`),
    /// under `mmu_lock` write: for every 2M, then 1G, block of `as_id` inside `gfns` that
    /// `allowed(block_gfn, level)` names, whose shadow page (linked from one parent SPTE) holds
    /// only present leaves mapping one contiguous, aligned run of frames with the same
    /// permissions, the page is prepare-zapped (its leaves leave their rmaps) and the parent SPTE
    /// becomes one huge leaf, added to the slot's rmap of that level. The leaf gets Accessed, and
    /// Dirty when writable (a child's concurrent D set cannot be lost: the leaf is conservatively
    /// dirty); it is not executable under the NX huge pages mitigation. A page with no present
    /// leaf is zapped instead (the block then faults huge). Returns the number of huge leaves
    /// formed and the batch that flushes remote TLBs once for the whole call, then frees the
    /// zapped pages: commit it before `mmu_lock` is dropped (S1).
    pub fn recover_huge_in_place(
        &self,
        as_id: crate::addr::AsId,
        rmaps: &SlotRmaps,
        gfns: GfnRange,
        allowed: impl Fn(u64, Level) -> bool,
        mmu: &MmuWrite,
    ) -> (u64, crate::mmu::types::ZapBatch) {
        use crate::mmu::spte::{
            ACCESSED_MASK, BASE_ADDR_MASK, DIRTY_MASK, PAGE_SIZE_MASK, Spte, SpteKind,
        };
        use crate::sync::atomic::Ordering;
        self.check_lock(mmu.lock_id());
        let sets = OneSlot { as_id, rmaps };
        let stats = &self.inner.rmap_stats;
        let mut invalid = super::zap::InvalidList::default();
        let mut formed = 0;
        let mut state = self.inner.state.lock();
        for level in [Level::L2M, Level::L1G] {
            if level > crate::mmu::hugepage::max_leaf_level() {
                break;
            }
            let n = level.pages();
            let Some(child_level) = level.down() else {
                continue;
            };
            let mut block = gfns.start().raw().next_multiple_of(n);
            while block + n <= gfns.end().raw() {
                let b = block;
                block += n;
                if !allowed(b, level) {
                    continue;
                }
                let Some(child) = Self::page_below(&state, as_id, b, level) else {
                    continue;
                };
                // SAFETY: in the hash under `mmu_lock` write: live (S1).
                let page = unsafe { child.get() };
                // The SPTE of the valid root's walk that links the page (skip if none does).
                let Some(parent_sp) = Self::link_of(&state, as_id, b, level, child) else {
                    continue;
                };
                // ORDERING: Relaxed: under `mmu_lock` write only hardware A/D updates race, and
                // the new leaf does not depend on them (doc above).
                let first = page.at(0).load(Ordering::Relaxed);
                let attrs = |s: Spte| s.raw() & !(BASE_ADDR_MASK | ACCESSED_MASK | DIRTY_MASK);
                let base = first.pfn().raw();
                let full = first.kind(child_level) == SpteKind::Leaf
                    && base == crate::geometry::align_down(base, level)
                    && (0..crate::geometry::ENTRIES).all(|i| {
                        // ORDERING: as above.
                        let s = page.at(i).load(Ordering::Relaxed);
                        s.kind(child_level) == SpteKind::Leaf
                            && attrs(s) == attrs(first)
                            && s.pfn().raw() == base + i as u64 * child_level.pages()
                    });
                let empty = (0..crate::geometry::ENTRIES)
                    // ORDERING: as above.
                    .all(|i| !page.at(i).load(Ordering::Relaxed).is_shadow_present());
                if !full && !empty {
                    continue;
                }
                // The huge leaf's owner word (G5, as TDP's G4): the children's claims if they
                // form one run, else unknown; read before the page is unlinked.
                let owner = crate::mmu::owner::recovered(
                    crate::geometry::ENTRIES,
                    child_level.pages(),
                    base,
                    // ORDERING: Relaxed: under `mmu_lock` write no install races us; each word
                    // was written before its leaf, which we read above.
                    |i| page.owner_word(i).map_or(0, |w| w.load(Ordering::Relaxed)),
                );
                // Unlinks the page (the parent SPTE becomes non-present) and takes its leaves
                // off their rmaps; the page is freed after the batch's flush (S1).
                self.prepare_zap(&mut state, child, &sets, mmu, &mut invalid);
                if empty {
                    continue;
                }
                let mut raw = first.raw() | PAGE_SIZE_MASK | ACCESSED_MASK;
                if first.is_writable() {
                    raw |= DIRTY_MASK;
                }
                let huge = self.inner.pages.nx_adjust(Spte::from_raw(raw), level);
                let Some(rmap) = rmaps.get(Gfn::new(b), level) else {
                    continue;
                };
                // SAFETY: the parent page is live under `mmu_lock` write (S1).
                let parent = unsafe { parent_sp.get() };
                if let Some(word) = parent.owner_word(crate::geometry::index(b, level)) {
                    // ORDERING: Relaxed: published by the leaf's Release store below (G5).
                    word.store(owner, Ordering::Relaxed);
                }
                // ORDERING: Release, as a fault's install: a vCPU that Acquire-loads the leaf sees
                // what this thread saw of the frames (spte.rs O2) and the owner word.
                parent.entry(b).store(huge, Ordering::Release);
                // SAFETY: the parent page is live under `mmu_lock` write; the SPTE leaves this
                // rmap before the page is freed (prepare-zap of the parent, S1).
                // Under the leaf name (a direct page's leaves are tagged: `SpPtr::leaf_sptep`), the
                // one its zap removes.
                let pte = unsafe { parent_sp.leaf_sptep(crate::geometry::index(b, level)) };
                let _ = rmap.rmap_add(mmu, stats, pte);
                self.inner.pages.install(level);
                super::mmu::add(&self.inner.counters.leaves_installed, 1);
                formed += 1;
            }
        }
        drop(state);
        (formed, self.commit_zap(invalid))
    }
}

impl ShadowMmu {
    /// Turns the NX huge pages mitigation on or off: from now on, huge leaves are installed
    /// without X (`mmu/hugepage.rs`), so an instruction fetch through one faults.
    pub fn set_nx_huge_pages(&self, on: bool) {
        self.inner.pages.set_nx_huge(on);
    }

    /// The direct shadow page that serves as the table of the `level` entry covering `gfn` in
    /// address space `as_id`, if one is live (`kvm_mmu_find_shadow_page`).
    fn page_below(
        state: &super::mmu::State,
        as_id: crate::addr::AsId,
        gfn: u64,
        level: Level,
    ) -> Option<super::page::SpPtr> {
        let role = super::page::Role {
            level: level.down()?,
            as_id,
            direct: true,
        };
        state
            .hash
            .get(&(crate::geometry::align_down(gfn, level), role))
            .copied()
    }

    /// The page of the valid root of `as_id`'s walk whose `level` entry covering `gfn` links
    /// `child` (`None` if the walk does not reach `child` there). Called under `mmu_lock` write.
    fn link_of(
        state: &super::mmu::State,
        as_id: crate::addr::AsId,
        gfn: u64,
        level: Level,
        child: super::page::SpPtr,
    ) -> Option<super::page::SpPtr> {
        use crate::mmu::spte::SpteKind;
        use crate::sync::atomic::Ordering;
        let mut sp = state.roots.get(as_id.index()).copied().flatten()?;
        loop {
            // SAFETY: reached from the valid root through present links under `mmu_lock`
            // write (the caller's): live (S1) while it is used here.
            let page = unsafe { sp.get() };
            let l = page.role.level;
            let e = page.entry(gfn);
            // ORDERING: non-leaf SPTEs change only under `mmu_lock` write, which the caller holds.
            let v = e.load(Ordering::Relaxed);
            if v.kind(l) != SpteKind::Table {
                return None;
            }
            let next = super::page::SpPtr::from_spte(v);
            if l == level {
                return (next == child).then_some(sp);
            }
            if l < level {
                return None;
            }
            sp = next;
        }
    }

    /// True if a live shadow page serves as the table of the `level` entry covering `gfn` in
    /// `as_id` (a split of that block is still in place). Takes the page-hash lock only: the
    /// page is not dereferenced.
    pub(crate) fn table_at(&self, as_id: crate::addr::AsId, gfn: u64, level: Level) -> bool {
        let state = self.inner.state.lock();
        Self::page_below(&state, as_id, gfn, level).is_some()
    }

    /// Zaps the shadow page below each `(gfn, level)` entry of `blocks` in `as_id`
    /// (prepare-zap of the NX huge page recovery, `kvm_mmu_prepare_zap_page`), so the block
    /// faults huge again. Returns the number of pages zapped and the batch that flushes remote
    /// TLBs once and then frees them; commit it before `mmu_lock` is dropped (S1).
    pub(crate) fn zap_pages_at(
        &self,
        as_id: crate::addr::AsId,
        blocks: &[(u64, Level)],
        sets: &(impl super::mmu::RmapLookup + ?Sized),
        mmu: &MmuWrite,
    ) -> (u64, crate::mmu::types::ZapBatch) {
        self.check_lock(mmu.lock_id());
        let mut invalid = super::zap::InvalidList::default();
        let mut zapped = 0;
        {
            let mut state = self.inner.state.lock();
            for &(gfn, level) in blocks {
                if let Some(sp) = Self::page_below(&state, as_id, gfn, level) {
                    self.prepare_zap(&mut state, sp, sets, mmu, &mut invalid);
                    zapped += 1;
                }
            }
        }
        (zapped, self.commit_zap(invalid))
    }
}

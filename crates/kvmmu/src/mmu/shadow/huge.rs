//! Huge leaves in the shadow MMU: making a range map at most a given level
//! (`shadow_mmu_try_split_huge_pages`'s effect). Under `mmu_lock` write the huge leaves above the
//! target level are dropped through their rmaps (`drop_large_spte`), with a remote TLB flush
//! before `mmu_lock` is released; the next fault maps the range at the level its memslot and host
//! then allow (dirty logging: 4K). The guest's data is in the host frames and stays.

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

impl ShadowMmu {
    /// Recovery for the shadow MMU (`kvm_rmap_zap_collapsible_sptes`): the small leaves of every
    /// block `allowed(block_gfn, level)` names inside `gfns` are zapped, so the next fault maps the
    /// block with one huge leaf. Returns the number of rmaps that held a leaf; non-zero means a
    /// remote TLB flush is due before `mmu_lock` is dropped.
    pub fn zap_collapsible(
        &self,
        rmaps: &SlotRmaps,
        gfns: GfnRange,
        allowed: impl Fn(u64, Level) -> bool,
        mmu: &MmuWrite,
    ) -> u64 {
        self.check_lock(mmu.lock_id());
        let mut zapped = 0;
        let level = Level::L2M;
        let n = level.pages();
        let mut block = gfns.start().align_down(level).raw();
        while block < gfns.end().raw() {
            if block >= gfns.start().raw() && block + n <= gfns.end().raw() && allowed(block, level)
            {
                for g in block..block + n {
                    if let Some(r) = rmaps.get(Gfn::new(g), Level::L4K)
                        && !r.is_empty()
                        && self.zap_rmap(r, Level::L4K, mmu)
                    {
                        zapped += 1;
                    }
                }
            }
            block += n;
        }
        zapped
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

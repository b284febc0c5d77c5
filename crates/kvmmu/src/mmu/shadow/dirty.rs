//! Dirty logging on the shadow MMU: re-arming by write-protection through the rmaps
//! (`kvm_mmu_write_protect_pt_masked`, `rmap_write_protect` without clearing MMU-writable).
//!
//! Runs under `mmu_lock` write, like every shadow writer of SPTEs (S-protocol in the parent
//! module); the rmap chains are walked with [`RmapHead::for_each_spte`](super::rmap::RmapHead::for_each_spte).
//! Each SPTE loses W with one atomic AND, so a concurrent CPU A/D set or lockless ager's
//! `fetch_and(!A)` is never lost (spec §4 item 19). The caller flushes remote TLBs before it
//! returns to its user (docs/locking.md "Dirty logging" D1).

use crate::addr::{Gfn, Level};
use crate::mmu::spte::{DIRTY_MASK, MMU_PRESENT_MASK, WRITABLE_MASK};
use crate::sync::witness::MmuWrite;

use super::{ShadowMmu, SlotRmaps};

impl ShadowMmu {
    /// Clears W on every SPTE in the 4K rmaps of `gfns` (within `rmaps`' slot); returns true if
    /// some SPTE lost W, i.e. remote TLBs must be flushed. MMU-writable is kept.
    pub fn write_protect_gfns(
        &self,
        rmaps: &SlotRmaps,
        gfns: impl IntoIterator<Item = Gfn>,
        mmu: &MmuWrite,
    ) -> bool {
        self.check_lock(mmu.lock_id());
        let mut flush = false;
        for gfn in gfns {
            // 4K rmaps only: enabling logging drops the slot's huge shadow leaves first
            // (`vm/dirty_log.rs`, whatever `eager_page_split` says), and a logging slot maps 4K.
            let Some(rmap) = rmaps.get(gfn, Level::L4K) else {
                continue;
            };
            rmap.for_each_spte(mmu, &self.inner.rmap_stats, |p| {
                let old = p.clear_bits(WRITABLE_MASK);
                flush |= old & WRITABLE_MASK != 0;
            });
        }
        flush
    }

    /// The D-bit re-arm through the rmaps: clears D on every SPTE of `gfns`, calling `dirty`
    /// with each gfn one of whose present SPTEs had D (from the value the AND returned). Returns
    /// true if some SPTE lost D (TLB entries that cached it must be flushed).
    pub fn clear_dirty_gfns(
        &self,
        rmaps: &SlotRmaps,
        gfns: impl IntoIterator<Item = Gfn>,
        mut dirty: impl FnMut(Gfn),
        mmu: &MmuWrite,
    ) -> bool {
        self.check_lock(mmu.lock_id());
        let mut any = false;
        for gfn in gfns {
            let Some(rmap) = rmaps.get(gfn, Level::L4K) else {
                continue;
            };
            let mut was = false;
            rmap.for_each_spte(mmu, &self.inner.rmap_stats, |p| {
                let old = p.clear_bits(DIRTY_MASK);
                was |= old & (DIRTY_MASK | MMU_PRESENT_MASK) == DIRTY_MASK | MMU_PRESENT_MASK;
            });
            if was {
                any = true;
                dirty(gfn);
            }
        }
        any
    }
}

//! Dirty logging on the shadow MMU: re-arming by write-protection through the rmaps
//! (`kvm_mmu_write_protect_pt_masked`, `rmap_write_protect` without clearing MMU-writable).
//!
//! Runs under `mmu_lock` write, like every shadow writer of SPTEs (S-protocol in the parent
//! module); the rmap chains are walked with [`RmapHead::for_each_spte`](super::rmap::RmapHead::for_each_spte).
//! Each SPTE loses W with one atomic AND, so a concurrent CPU A/D set or lockless ager's
//! `fetch_and(!A)` is never lost (spec §4 item 19). The caller flushes remote TLBs before it
//! returns to its user (docs/locking.md "Dirty logging" D1).

use crate::addr::{Gfn, Level};
use crate::mmu::spte::WRITABLE_MASK;
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
            // HUGE-PAGE HOOK: huge shadow leaves (higher-level rmaps) would be split or
            // write-protected here; the shadow MMU installs 4K leaves only today.
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
}

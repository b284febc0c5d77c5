//! Dirty logging on the shadow MMU: re-arming by write-protection through the rmaps
//! (`kvm_mmu_write_protect_pt_masked`, `rmap_write_protect` without clearing MMU-writable).
//!
//! Runs under `mmu_lock` write, like every shadow writer of SPTEs (S-protocol in the parent
//! module); the rmap chains are walked with [`RmapHead::for_each_spte`](super::rmap::RmapHead::for_each_spte).
//! Each SPTE loses W with one atomic AND, so a concurrent CPU A/D set or lockless ager's
//! `fetch_and(!A)` is never lost (spec §4 item 19). The caller flushes remote TLBs before it
//! returns to its user (docs/locking.md "Dirty logging" D1).
//!
//! The fast page fault ([`ShadowMmu::fast_page_fault_in_guest`], `fast_page_fault` on a direct
//! shadow page) needs no lock at all: it runs in the faulting vCPU's own walk, in guest mode,
//! where S2 keeps every shadow page it reaches alive (the kernel's
//! `walk_shadow_page_lockless_begin`, whose IRQ-disabled walker makes remote flushes wait), and
//! fixes the leaf with the same one whole-word CAS as the TDP fast path (D2, AD2). `mmu_lock`
//! write holders change leaves only atomically (swap, AND, CAS), so the CAS either lands first or
//! fails.

use crate::addr::{Gfn, Level};
use crate::mmu::spte::{DIRTY_MASK, MMU_PRESENT_MASK, WRITABLE_MASK};
use crate::mmu::types::{FastFault, fix_fast};
use crate::sync::witness::MmuWrite;

use super::mmu::ShadowRoot;
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

    /// The fast page fault on a shadow root (`fast_page_fault`; every shadow page here is
    /// direct): for an access to `gfn` (a write if `write`), one CAS makes a present 4K leaf
    /// write-protected for dirty logging writable, or restores one marked for access tracking
    /// (`mmu::types::fix_fast`). No lock.
    ///
    /// # Safety
    /// The caller is a vCPU in guest mode holding `root`, inside one instruction: it acknowledges
    /// no remote TLB flush until this returns, so no shadow page it reaches is freed meanwhile
    /// (S2).
    pub unsafe fn fast_page_fault_in_guest(
        &self,
        root: &ShadowRoot,
        gfn: Gfn,
        write: bool,
    ) -> FastFault {
        debug_assert!(
            root.belongs_to(self),
            "fast_page_fault_in_guest: foreign root"
        );
        if root.is_invalid() {
            return FastFault::Slow;
        }
        // SAFETY: we hold a reference to `root`; this function's contract covers its children
        // (S2).
        let Some((sptep, old, level)) = (unsafe { Self::find_leaf(root.sp, gfn.raw()) }) else {
            return FastFault::Slow;
        };
        if level != Level::L4K {
            return FastFault::Slow;
        }
        fix_fast(sptep, old, write)
    }
}

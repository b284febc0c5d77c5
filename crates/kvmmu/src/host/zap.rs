//! Removing host PTEs (`zap_pte_range`): huge pages wholly inside the range go back as runs,
//! every other present PTE frees its frame. Called with `mmap_lock` held for write, after
//! `invalidate_range_start` (host H1, H2).

use core::ops::ControlFlow;

use super::frames::{FrameArena, RUN_2M};
use super::huge::{split_cut, zap_huge};
use super::pgtable::PageTable;
use super::reclaim::Reclaim;
use super::swap::swap_slot;
use super::vma::{pte, pte_frame};
use crate::sync::atomic::{AtomicU64, Ordering};

/// Clears the present PTEs of pages `[s, e)` and frees their frames. Called with `mmap_lock`
/// held for write, after `invalidate_range_start` (H1, H2). Visits only allocated leaves and
/// writes only present PTEs, so an untouched range costs no memory.
pub(super) fn zap_ptes(pt: &PageTable, s: u64, e: u64, arena: &FrameArena, reclaim: &Reclaim) {
    // Huge pages are never charged to the memory limit nor evicted (reclaim handles 4K pages).
    // A THP the range cuts becomes 4K pages first, charged (docs/locking.md C4), so the loop below
    // uncharges only charged frames. Structural operations split it before (`change_range`);
    // `release` zaps VMA by VMA, and a VMA boundary may cut a THP (madvise(NOHUGEPAGE) or an
    // mprotect that changed no protection split the VMA, not the THP).
    reclaim.charge_forced(split_cut(pt, s, e) * RUN_2M as u64);
    zap_huge(pt, s, e, arena);
    let _ = pt.for_each_leaf(s, e, |first, ptes| {
        for (i, w) in ptes.iter().enumerate() {
            zap_pte(first + i as u64, w, arena, reclaim);
        }
        ControlFlow::Continue(())
    });
}

/// Clears one PTE and frees its frame if it was present, or its swap slot if it was a swap entry
/// (see [`zap_ptes`]).
#[inline]
fn zap_pte(page: u64, w: &AtomicU64, arena: &FrameArena, reclaim: &Reclaim) {
    // ORDERING: Relaxed: mmap_lock write excludes every other PTE user (H3), and its release
    // orders this before later readers.
    if w.load(Ordering::Relaxed) == 0 {
        return;
    }
    // ORDERING: as the load above.
    let old = w.swap(0, Ordering::Relaxed);
    if old & pte::PRESENT != 0 {
        let (pfn, tag) = pte_frame(page, old);
        // The only way this free can fail is a caller that freed the frame itself through the
        // public `FrameArena::free`. Panicking here would abandon the invalidation between start
        // and end (leaving every subscriber's counters raised for good), so the frame is reported
        // like a stale access instead and the teardown of the range completes.
        if arena.free(pfn, tag).is_err() {
            arena.report_stale(pfn, tag, arena.tag(pfn));
        }
        reclaim.uncharge(1);
    } else if let Some(slot) = swap_slot(old) {
        reclaim.drop_swap_slot(slot);
    }
}

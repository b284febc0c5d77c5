//! Per-memslot large-page information (`slot->arch.lpage_info`, `kvm_alloc_memslot_metadata`):
//! for each huge level (2M, 1G) and each level-aligned block of guest frames touching the slot, a
//! `disallow_lpage` count. A block may be mapped by one huge leaf only while its count is 0.
//!
//! Counts held from creation (spec: `kvm-features.md` §1, "Large pages" in KVM's mmu.rst):
//! - the partial first block of a slot whose `base_gfn` is not level aligned, and the partial
//!   last block of one whose end is not: a huge leaf there would map frames outside the slot;
//! - every block, when `base_gfn` and `userspace_addr` are not equally aligned at the level: no
//!   huge host page can then back a huge guest block.
//!
//! Later users (write tracking of guest page tables, NX recovery) add and remove counts with
//! [`LpageInfo::account`]. Invariant: a count never drops below what creation set (every
//! `account(+1)` is paired with one `account(-1)` by its owner).

use crate::addr::{Gfn, Level, PAGE_SHIFT};
use crate::sync::atomic::{AtomicU32, Ordering};

/// The huge levels that have large-page information.
const LEVELS: [Level; 2] = [Level::L2M, Level::L1G];

/// The `disallow_lpage` counts of one memslot.
pub struct LpageInfo {
    base: u64,
    /// Per level of [`LEVELS`], one count per aligned block touching the slot.
    counts: [Box<[AtomicU32]>; 2],
}

impl core::fmt::Debug for LpageInfo {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("LpageInfo")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn shift(level: Level) -> u32 {
    level.pages().trailing_zeros()
}

impl LpageInfo {
    /// The counts of a slot of `npages` (>= 1) frames from `base_gfn`, backed from host page
    /// `hva_page`.
    pub(crate) fn new(base_gfn: u64, npages: u64, hva_page: u64) -> LpageInfo {
        let end = base_gfn + npages;
        let counts = LEVELS.map(|level| {
            let n = level.pages();
            let sh = shift(level);
            let len = (((end - 1) >> sh) - (base_gfn >> sh) + 1) as usize;
            let misaligned = u32::from(!(base_gfn ^ hva_page).is_multiple_of(n));
            let v: Box<[AtomicU32]> = (0..len).map(|_| AtomicU32::new(misaligned)).collect();
            // ORDERING: Relaxed: not yet shared.
            if !base_gfn.is_multiple_of(n) {
                v[0].fetch_add(1, Ordering::Relaxed);
            }
            if !end.is_multiple_of(n) {
                v[len - 1].fetch_add(1, Ordering::Relaxed);
            }
            v
        });
        LpageInfo {
            base: base_gfn,
            counts,
        }
    }

    fn slot(&self, gfn: Gfn, level: Level) -> Option<&AtomicU32> {
        let li = LEVELS.iter().position(|l| *l == level)?;
        let sh = shift(level);
        let idx = (gfn.raw() >> sh).checked_sub(self.base >> sh)?;
        self.counts[li].get(usize::try_from(idx).ok()?)
    }

    /// The `disallow_lpage` count of the `level` block holding `gfn` (`None` outside the slot or
    /// for a level without counts).
    pub fn disallow_lpage(&self, gfn: Gfn, level: Level) -> Option<u32> {
        // ORDERING: Relaxed: a fault reads the count before taking `mmu_lock`; whoever raises it
        // zaps the huge leaves of the block under `mmu_lock` afterwards (KVM's protocol).
        self.slot(gfn, level).map(|c| c.load(Ordering::Relaxed))
    }

    /// The largest level (up to 1G) at which the block holding `gfn` may be mapped huge.
    pub fn max_level(&self, gfn: Gfn) -> Level {
        let mut best = Level::L4K;
        for level in LEVELS {
            if self.disallow_lpage(gfn, level) == Some(0) {
                best = level;
            } else {
                break;
            }
        }
        best
    }

    /// Adds `delta` to the count of every level's block holding `gfn` (`update_gfn_disallow_lpage
    /// _count`); false (and nothing changed) if `gfn` is outside the slot.
    pub fn account(&self, gfn: Gfn, delta: i32) -> bool {
        if LEVELS.iter().any(|l| self.slot(gfn, *l).is_none()) {
            return false;
        }
        for level in LEVELS {
            if let Some(c) = self.slot(gfn, level) {
                // ORDERING: Relaxed: see `disallow_lpage`.
                c.fetch_add(delta as u32, Ordering::Relaxed);
            }
        }
        true
    }
}

/// The host page of a host address (for callers holding a raw `Hva`).
pub(crate) const fn hva_page(hva: u64) -> u64 {
    hva >> PAGE_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unaligned_slot_disallows_its_partial_head_and_tail_blocks_only() {
        // gfns [510, 1540): 2M blocks 0 (partial), 1, 2, 3 (partial).
        let l = LpageInfo::new(510, 1030, 1 << 20 | 510);
        assert_eq!(l.disallow_lpage(Gfn::new(510), Level::L2M), Some(1));
        assert_eq!(l.disallow_lpage(Gfn::new(512), Level::L2M), Some(0));
        assert_eq!(l.disallow_lpage(Gfn::new(1535), Level::L2M), Some(0));
        assert_eq!(l.disallow_lpage(Gfn::new(1539), Level::L2M), Some(1));
        assert_eq!(l.max_level(Gfn::new(700)), Level::L2M);
        assert_eq!(l.max_level(Gfn::new(511)), Level::L4K);
        assert_eq!(
            l.disallow_lpage(Gfn::new(700), Level::L1G),
            Some(2),
            "head and tail"
        );
        assert_eq!(l.disallow_lpage(Gfn::new(1 << 20), Level::L2M), None);
    }

    #[test]
    fn differently_aligned_gpa_and_hva_disallow_every_block() {
        let l = LpageInfo::new(0, 4096, 7);
        for g in (0..4096).step_by(512) {
            assert_eq!(l.max_level(Gfn::new(g)), Level::L4K);
        }
        let l = LpageInfo::new(0, 1 << 18, 1 << 18);
        assert_eq!(l.max_level(Gfn::new(5)), Level::L1G);
        assert!(l.account(Gfn::new(5), 1));
        assert_eq!(l.max_level(Gfn::new(5)), Level::L4K);
        assert!(l.account(Gfn::new(5), -1));
        assert_eq!(l.max_level(Gfn::new(5)), Level::L1G);
        assert!(!l.account(Gfn::new(1 << 18), 1));
    }
}

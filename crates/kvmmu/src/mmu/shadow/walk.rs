//! Walks of shadow pages: the simulated CPU's (`hardware_walk`, in guest mode, S2) and the
//! oracle's (`leaf`, under `mmu_lock`).

use crate::addr::{AsId, Gfn, Level};
use crate::geometry::{GFN_LIMIT, index};
use crate::mmu::spte::{AtomicSpte, Spte, SpteKind};
use crate::mmu::types::{HwWalk, access_leaf};
use crate::sync::atomic::Ordering;
use crate::sync::witness::MmuRead;

use super::mmu::{ShadowMmu, ShadowRoot};
use super::page::{ShadowPage, SpPtr};

impl ShadowMmu {
    /// Walks from `root` to the leaf slot of `gfn`, or `None` at the first non-present entry.
    ///
    /// # Safety
    /// The caller holds a reference to `root` and either holds `mmu_lock` or is a vCPU in guest
    /// mode that stays before its next instruction boundary for `'a` (S2).
    pub(super) unsafe fn find_leaf<'a>(
        root: SpPtr,
        gfn: u64,
    ) -> Option<(&'a AtomicSpte, Spte, Level)> {
        // SAFETY: this function's contract.
        let (page, i, spte) = unsafe { Self::find_leaf_slot::<'a>(root, gfn) }?;
        Some((page.at(i), spte, page.role.level))
    }

    /// [`ShadowMmu::find_leaf`], returning the page holding the leaf and the leaf's index in it.
    ///
    /// # Safety
    /// As [`ShadowMmu::find_leaf`].
    unsafe fn find_leaf_slot<'a>(root: SpPtr, gfn: u64) -> Option<(&'a ShadowPage, usize, Spte)> {
        if gfn >= GFN_LIMIT {
            return None;
        }
        let mut sp = root;
        loop {
            // SAFETY: the root is referenced; a child was read from a present non-leaf SPTE and
            // is freed only after a flush that this caller has not acknowledged yet, or under
            // `mmu_lock` write, which excludes this caller (S1, S2).
            let page = unsafe { sp.get::<'a>() };
            let i = index(gfn, page.role.level);
            // ORDERING: O1: the value may be followed into a child page.
            let spte = page.at(i).load(Ordering::Acquire);
            match spte.kind(page.role.level) {
                SpteKind::Leaf => return Some((page, i, spte)),
                SpteKind::Table => sp = SpPtr::from_spte(spte),
                SpteKind::NonPresent | SpteKind::Frozen => return None,
            }
        }
    }

    /// The simulated CPU's walk of a shadow root: like the TDP MMU's,
    /// it sets A (and D on a write) with a compare-and-swap on a present leaf that allows the access.
    ///
    /// # Safety
    /// The caller is a vCPU in guest mode that acknowledges remote TLB flushes only at instruction
    /// boundaries, and this walk is inside one instruction (S2).
    ///
    /// Also returns the host page the leaf's installer recorded for the frame the walk found, if
    /// it recorded one for exactly this leaf (G5 in docs/locking.md: the vCPU's fill then checks
    /// the frame against it instead of the memslots).
    pub(crate) unsafe fn hardware_walk(
        &self,
        root: &ShadowRoot,
        gfn: Gfn,
        write: bool,
    ) -> (HwWalk, Option<u64>) {
        debug_assert!(root.belongs_to(self), "hardware_walk: foreign root");
        // SAFETY: we hold a reference to `root`; this function's contract covers its children.
        let Some((page, i, spte)) = (unsafe { Self::find_leaf_slot(root.sp, gfn.raw()) }) else {
            return (HwWalk::NotPresent, None);
        };
        let hit = access_leaf(page.at(i), spte, page.role.level, gfn.raw(), write);
        let HwWalk::Hit { pfn, .. } = hit else {
            return (hit, None);
        };
        let host_page = page.owner_word(i).and_then(|w| {
            // ORDERING: Relaxed after the leaf's Acquire load in `find_leaf`, which pairs with
            // the install's Release store that follows the word's store (G5).
            let word = w.load(Ordering::Relaxed);
            crate::mmu::owner::expected_host_page(word, spte.pfn().raw(), pfn.raw())
        });
        (hit, host_page)
    }

    /// The present leaf mapping `gfn` under the valid root of `as_id` (oracle for tests and
    /// tools). Needs `mmu_lock` (read suffices: every change to shadow pages takes it for write).
    pub fn leaf(&self, as_id: AsId, gfn: Gfn, mmu: &MmuRead) -> Option<(Spte, Level)> {
        self.check_lock(mmu.lock_id());
        let root = self
            .inner
            .state
            .lock()
            .roots
            .get(as_id.index())
            .copied()
            .flatten()?;
        // SAFETY: under `mmu_lock` no page is freed and a valid root holds the MMU's reference.
        let (_, spte, level) = unsafe { Self::find_leaf(root, gfn.raw()) }?;
        Some((spte, level))
    }

    /// Live shadow pages in the hash (valid pages; diagnostics and tests).
    pub fn live_pages(&self, mmu: &MmuRead) -> usize {
        self.check_lock(mmu.lock_id());
        self.inner.state.lock().hash.len()
    }
}

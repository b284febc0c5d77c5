//! The TDP iterator (`tdp_iter`): a pre-order walk over the SPTEs covering a gfn range.
//!
//! It visits every entry, at every level, whose gfn span intersects `[start, end)`: non-leaf
//! SPTEs, non-present SPTEs (whose whole span is then skipped) and huge leaves covering `start`.
//! Before stepping down it re-reads the SPTE with `Acquire` (spte.rs O1), so it never enters a
//! table unlinked since the snapshot, and it never keeps a table pointer beyond the RCU read
//! section `'g` it was loaded in (tdp/mod.rs P1). A caller that yields drops the iterator and the
//! guard and starts a new iterator at [`TdpIter::next_gfn`] (`tdp_iter_restart`).

use core::marker::PhantomData;

use crate::addr::Level;
use crate::mmu::spte::{AtomicSpte, Spte, SpteKind};
use crate::sync::atomic::Ordering;
use crate::sync::rcu::RcuGuard;

use super::table::{Table, TablePtr};
use crate::geometry::{ENTRIES, ROOT_LEVEL, align_down, index, pages};

/// Depth of the deepest path from the root table to a 4K table.
const DEPTH: usize = ROOT_LEVEL.get() as usize;

/// A pre-order walk of one root's SPTEs over `[start, end)`, valid for the RCU section `'g`.
pub(crate) struct TdpIter<'g> {
    /// `path[l - 1]` is the table at level `l` on the way down to the current SPTE.
    path: [Option<&'g Table>; DEPTH],
    level: Level,
    /// Base gfn of the current SPTE (rounded down to its level).
    gfn: u64,
    /// The lowest gfn not yet fully visited (`next_last_level_gfn`): where a restart resumes.
    next_gfn: u64,
    end: u64,
    /// Snapshot of the current SPTE.
    old: Spte,
    valid: bool,
    _rcu: PhantomData<&'g RcuGuard<'g>>,
}

impl<'g> TdpIter<'g> {
    /// Starts a walk of the tree under `root` over `[start, end)`.
    ///
    /// # Safety
    /// `root` must stay allocated for `'g`: it is the root table of a root the caller holds a
    /// reference to, or reached under an RCU guard that lives for `'g` (P4). Tables below it are
    /// reached under the same guard (P1), which `_rcu` ties to `'g`.
    pub(crate) unsafe fn new(
        root: TablePtr,
        start: u64,
        end: u64,
        _rcu: &'g RcuGuard<'_>,
    ) -> TdpIter<'g> {
        let mut path = [None; DEPTH];
        // SAFETY: the caller guarantees the root table is allocated for 'g (this function's
        // contract, P4).
        path[DEPTH - 1] = Some(unsafe { root.get() });
        let mut it = TdpIter {
            path,
            level: ROOT_LEVEL,
            gfn: align_down(start, ROOT_LEVEL),
            next_gfn: start,
            end,
            old: Spte::NONPRESENT,
            valid: start < end,
            _rcu: PhantomData,
        };
        it.refresh();
        it
    }

    /// True while the current position is inside the range.
    #[inline]
    pub(crate) fn valid(&self) -> bool {
        self.valid && self.gfn < self.end
    }
    /// The current level.
    #[inline]
    pub(crate) fn level(&self) -> Level {
        self.level
    }
    /// The snapshot of the current SPTE (refreshed on every move, or by [`Self::set_old`]).
    #[inline]
    pub(crate) fn old(&self) -> Spte {
        self.old
    }
    /// Replaces the snapshot with a fresher value (e.g. the value a failed CAS or a swap returned).
    #[inline]
    pub(crate) fn set_old(&mut self, v: Spte) {
        self.old = v;
    }
    /// Base gfn of the current SPTE (its gfn rounded down to the current level).
    #[inline]
    pub(crate) fn gfn(&self) -> u64 {
        self.gfn
    }
    /// Where a restarted walk must resume so that nothing is visited twice or skipped.
    #[inline]
    pub(crate) fn next_gfn(&self) -> u64 {
        self.next_gfn
    }
    /// The current SPTE slot.
    #[inline]
    pub(crate) fn sptep(&self) -> &'g AtomicSpte {
        self.table(self.level).entry(self.gfn, self.level)
    }

    #[inline]
    fn table(&self, level: Level) -> &'g Table {
        self.path[level.get() as usize - 1]
            .expect("the iterator's path holds every table from the root down to its level")
    }

    #[inline]
    fn refresh(&mut self) {
        // ORDERING: O1 (spte.rs) — the snapshot may be followed into a child table.
        self.old = self.sptep().load(Ordering::Acquire);
    }

    fn try_step_down(&mut self) -> bool {
        let Some(child_level) = self.level.down() else {
            return false;
        };
        // Re-read: the SPTE may have been unlinked since the snapshot (`tdp_iter` step-down).
        // ORDERING: O1 — Acquire pairs with the Release of the CAS that linked the child.
        let spte = self.sptep().load(Ordering::Acquire);
        if spte.kind(self.level) != SpteKind::Table {
            return false;
        }
        let child = TablePtr::from_spte(spte);
        // SAFETY: `child` was read from a present non-leaf SPTE of a table valid for 'g, while
        // the RCU guard of 'g is pinned; P1 keeps it allocated until that guard is dropped.
        self.path[child_level.get() as usize - 1] = Some(unsafe { child.get() });
        self.level = child_level;
        self.gfn = align_down(self.next_gfn.max(self.gfn), child_level);
        self.refresh();
        true
    }

    fn try_step_side(&mut self) -> bool {
        if index(self.gfn, self.level) == ENTRIES - 1 {
            return false;
        }
        self.gfn += pages(self.level);
        self.next_gfn = self.gfn;
        self.refresh();
        true
    }

    fn try_step_up(&mut self) -> bool {
        let Some(up) = self.level.up().filter(|l| *l <= ROOT_LEVEL) else {
            return false;
        };
        self.level = up;
        self.gfn = align_down(self.gfn, up);
        true
    }

    /// If the current SPTE links a table of 4K leaves, that table; `None` for anything else
    /// (a leaf, NONPRESENT, FROZEN, or a link to a higher-level table).
    ///
    /// Like a step down it re-reads the SPTE with `Acquire`, so it never returns a table unlinked
    /// since the snapshot. It lets a caller scan the 4K entries of one table in a tight loop and
    /// then [`Self::skip_span`] over them, instead of stepping through them one by one.
    #[inline]
    pub(crate) fn leaf_table(&self) -> Option<&'g Table> {
        if self.level.down() != Some(Level::L4K) {
            return None;
        }
        // ORDERING: O1 — Acquire pairs with the Release of the CAS that linked the child, so the
        // caller reads its initialised entries.
        let spte = self.sptep().load(Ordering::Acquire);
        if spte.kind(self.level) != SpteKind::Table {
            return None;
        }
        // SAFETY: as in `try_step_down`: `spte` is a present non-leaf SPTE read from a table valid
        // for 'g while the RCU guard of 'g is pinned; P1 keeps the child allocated until then.
        Some(unsafe { TablePtr::from_spte(spte).get() })
    }

    /// Moves past the whole span of the current SPTE without descending into it: to the next
    /// entry of this table, or up and on (`tdp_iter_step_side` / `tdp_iter_step_up`). The caller
    /// must have dealt with everything below the current SPTE, since [`Self::next_gfn`] moves past
    /// it.
    pub(crate) fn skip_span(&mut self) {
        loop {
            if self.try_step_side() {
                return;
            }
            if !self.try_step_up() {
                // Past the last entry of the root table.
                self.next_gfn = self.end;
                self.valid = false;
                return;
            }
        }
    }

    /// Moves to the next SPTE in pre-order (`tdp_iter_next`).
    pub(crate) fn next(&mut self) {
        if self.try_step_down() {
            return;
        }
        self.skip_span();
    }
}

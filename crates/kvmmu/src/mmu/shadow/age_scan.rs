//! The rmap scan of shadow aging, one level at a time: empty rmaps are skipped a cache line of
//! heads at a time, and a direct shadow page's SPTEs are read in table order under one read-only
//! rmap bit wherever the rmaps show that nothing else maps their gfns (docs/invariants.md
//! "Shadow aging in table order").
//!
//! # Protocol
//! For each nonempty head, in gfn order:
//! 1. Lock it read-only (`kvm_rmap_lock_readonly`). If its chain is not exactly one SPTE of a
//!    direct page at this level mapping this head's block, age the chain as the kernel does and go
//!    on with the next head.
//! 2. Otherwise that SPTE is the **pin**: while we hold the bit it stays in its rmap, so its shadow
//!    page stays allocated (S1: a page is freed only after every SPTE of it left its rmap, which
//!    takes the bit). Age it, then walk the page's next slots and the next heads together: a head
//!    that is empty is skipped, a head that lists exactly the next slot ([`RmapHead::lists_only`])
//!    has that slot aged, and any other head (a chain, another SPTE, LOCKED) ends the run; so does
//!    the end of the page's table or [`RUN_MAX`] heads. Unlock the pin.
//! 3. Continue at the first head the run did not age.
//!
//! # Invariants (cited as A1–A3)
//! 1. **A1 (memory)** A slot of the pinned page is read or cleared only while the pin's bit is
//!    held; nothing is ever read through a head word loaded without its bit.
//! 2. **A2 (completeness)** Every head of the level is visited once. A head aged in a run listed
//!    exactly the slot we age at the moment of its load, so no other SPTE mapped its gfn then;
//!    the walk of that rmap linearizes at that load, as a locked walk linearizes at its lock (an
//!    SPTE added later is a mapping made after the walk passed; one removed later is read as the
//!    locked walk reads an SPTE zapped under it: present or not, never freed).
//! 3. **A3 (right gfn)** A direct page's slot `i` maps only `sp.gfn + i * level.pages()` (it is
//!    re-filled, if at all, by a fault for that same gfn), so clearing Accessed in a slot whose
//!    head stopped listing it after the load still ages the gfn the head covers. Indirect pages
//!    never start a run (their slots may be re-pointed at other gfns).

use core::ops::ControlFlow;

use crate::addr::Level;
use crate::geometry::ENTRIES;
use crate::mmu::spte::AtomicSpte;

use super::page::SpPtr;
use super::rmap::{
    AgeAction, RmapHead, RmapStats, SPTE_ACCESSED_MASK, SptePtr, age_loaded, age_one,
};
use super::slot_rmaps::first_nonempty;

/// Most heads aged under one pin: one page table. Bounds how long the pin's bit is held (only a
/// writer of the pin's own rmap waits for it; at 100% young a table takes a few microseconds, and
/// the bit's sections must stay short, spec §3.9). 64 cost 20% of the 0%-young scan rate.
pub(super) const RUN_MAX: usize = ENTRIES;

/// Heads (and slots) tested together on a run's fast path: a cache line of slots.
const CHUNK: usize = 8;

/// What one aging call found, kept in the caller's locals (no shared line is written).
#[derive(Default)]
pub(super) struct AgeTally {
    /// SPTEs read.
    pub(super) visited: u64,
    /// Accessed bits cleared.
    pub(super) cleared: u64,
    /// Some SPTE was present and young.
    pub(super) young: bool,
}

/// One level's heads: `heads[i]` is the rmap of the `level` block starting at gfn
/// `first + i * level.pages()`.
pub(super) struct LevelHeads<'a> {
    pub(super) heads: &'a [RmapHead],
    pub(super) first: u64,
    pub(super) level: Level,
}

impl LevelHeads<'_> {
    /// Ages every head with `action`; calls `young_head(i)` once per head `i` found with a young
    /// SPTE (not for [`AgeAction::TestOnly`], which breaks at the first young SPTE instead).
    #[inline]
    pub(super) fn age(
        &self,
        stats: &RmapStats,
        action: AgeAction,
        tally: &mut AgeTally,
        young_head: &mut impl FnMut(usize),
    ) -> ControlFlow<()> {
        let mut i = first_nonempty(self.heads, 0);
        while i < self.heads.len() {
            i = self.age_from(i, stats, action, tally, young_head)?;
            i = first_nonempty(self.heads, i);
        }
        ControlFlow::Continue(())
    }

    /// Protocol steps 1–2 from head `i`; returns the index of the first head not aged.
    #[inline]
    fn age_from(
        &self,
        i: usize,
        stats: &RmapStats,
        action: AgeAction,
        tally: &mut AgeTally,
        young_head: &mut impl FnMut(usize),
    ) -> ControlFlow<(), usize> {
        let guard = self.heads[i].lock_readonly(stats);
        let Some(pin) = guard.single() else {
            // Empty by now, or a chain: the kernel's per-rmap walk.
            if guard.age(action, &mut tally.visited, &mut tally.cleared) {
                tally.young = true;
                if action == AgeAction::TestOnly {
                    return ControlFlow::Break(());
                }
                young_head(i);
            }
            return ControlFlow::Continue(i + 1);
        };
        if !pin.is_direct_leaf() {
            // Not known to be a slot of a direct page: the kernel's walk of this one rmap.
            let mut young = false;
            age_one(
                pin,
                action,
                &mut young,
                &mut tally.visited,
                &mut tally.cleared,
            )?;
            if young {
                tally.young = true;
                young_head(i);
            }
            return ControlFlow::Continue(i + 1);
        }
        let (sp, idx) = SpPtr::containing(pin);
        // SAFETY: `guard` holds the bit of an rmap whose chain lists `pin`, an SPTE of `sp`
        // (S6), so `sp` stays allocated while `guard` lives (S1; `SpPtr::get`'s bit case).
        let page = unsafe { sp.get() };
        let block = self.first + i as u64 * self.level.pages();
        let run =
            if page.role.direct && page.role.level == self.level && page.gfn_of(idx).raw() == block
            {
                (ENTRIES - idx).min(self.heads.len() - i).min(RUN_MAX)
            } else {
                1
            };
        let slot = |k: usize| {
            // SAFETY: A1: the page is pinned by `guard`, which outlives every use of the returned
            // pointer (the closure borrows `page`, and the guard is dropped after the loop); the
            // page is direct and its leaves are listed in their gfns' rmaps (S6).
            unsafe { SptePtr::from_direct_leaf(page.at(k)) }
        };
        let mut j = 0;
        while j < run {
            if j > 0 && j + CHUNK <= run {
                let mut snap = [0; CHUNK];
                if self.chunk_listed(i + j, idx + j, page.table(), &mut snap) {
                    tally.visited += CHUNK as u64;
                    if snap.iter().fold(0, |a, s| a | s) & SPTE_ACCESSED_MASK != 0 {
                        for (t, &old) in snap.iter().enumerate() {
                            let mut young = false;
                            age_loaded(
                                slot(idx + j + t),
                                old,
                                action,
                                &mut young,
                                &mut tally.cleared,
                            )?;
                            if young {
                                tally.young = true;
                                young_head(i + j + t);
                            }
                        }
                    }
                    j += CHUNK;
                    continue;
                }
            }
            let s = slot(idx + j);
            let head = &self.heads[i + j];
            if j > 0 && !head.lists_only(s) {
                if head.is_empty() {
                    j += 1;
                    continue;
                }
                break;
            }
            let mut young = false;
            age_one(
                s,
                action,
                &mut young,
                &mut tally.visited,
                &mut tally.cleared,
            )?;
            if young {
                tally.young = true;
                young_head(i + j);
            }
            j += 1;
        }
        drop(guard);
        ControlFlow::Continue(i + j)
    }

    /// True if heads `h..h + CHUNK` each list exactly the slots `table[k..k + CHUNK]` of the
    /// pinned page (A1: the caller holds the pin); `snap` gets the slots' values, each read once.
    #[inline]
    fn chunk_listed(
        &self,
        h: usize,
        k: usize,
        table: &[AtomicSpte],
        snap: &mut [u64; CHUNK],
    ) -> bool {
        let (Some(heads), Some(slots)) = (self.heads.get(h..h + CHUNK), table.get(k..k + CHUNK))
        else {
            return false;
        };
        let mut listed = true;
        for ((head, slot), v) in heads.iter().zip(slots).zip(snap.iter_mut()) {
            // SAFETY: A1: the slot's page is pinned by the caller's bit for this call.
            let s = unsafe { SptePtr::from_direct_leaf(slot) };
            listed &= head.lists_only(s);
            *v = s.load_lockless();
        }
        listed
    }
}

#[cfg(test)]
mod tests {
    use super::super::ShadowMmu;
    use super::super::mmu::RmapLookup;
    use super::super::rmap::{AgeAction, RmapHead, SptePtr};
    use super::super::slot_rmaps::SlotRmaps;
    use crate::addr::{AsId, Gfn, GfnRange, Level, Pfn};
    use crate::mmu::types::{FaultOutcome, MapRequest, RemoteTlbFlush};
    use crate::sync::atomic::{AtomicU64, Ordering};
    use crate::sync::witness::MmuLock;

    const GFNS: u64 = 2048;

    /// The same rmaps for both address spaces, so a gfn mapped in both has a two-entry chain.
    struct SharedSlot(SlotRmaps);

    impl RmapLookup for SharedSlot {
        fn leaf_rmap(&self, _as_id: AsId, gfn: Gfn, level: Level) -> Option<&RmapHead> {
            self.0.get(gfn, level)
        }
    }

    struct NoFlush;
    impl RemoteTlbFlush for NoFlush {
        fn flush_remote_tlbs(&self) {}
    }

    fn range(a: u64, b: u64) -> GfnRange {
        GfnRange::new(Gfn::new(a), Gfn::new(b)).unwrap()
    }

    #[test]
    fn table_order_aging_ages_every_leaf_once_around_chains_holes_and_foreign_sptes() {
        let mmu = ShadowMmu::new(2);
        let lock = MmuLock::new();
        let slot = SharedSlot(SlotRmaps::new(range(0, GFNS)).unwrap());
        let w = lock.write();
        let roots = [0, 1].map(|a| mmu.get_root(AsId::new(a), w.witness()));
        let map = |a: usize, g: u64| {
            let req = MapRequest {
                gfn: Gfn::new(g),
                pfn: Pfn::new(g + 100),
                level: Level::L4K,
                host_writable: true,
                write_fault: false,
                prefetch: false,
            };
            let out = mmu.map(&roots[a], &req, &slot.0, w.witness(), &NoFlush);
            assert_eq!(out, FaultOutcome::Fixed, "map of gfn {g} in as {a}");
        };
        // Address space 0 maps everything but every 37th gfn (holes inside runs); address space
        // 1 maps every 50th gfn too (two-entry chains that end runs).
        let mapped: Vec<u64> = (0..GFNS).filter(|g| g % 37 != 5).collect();
        for &g in &mapped {
            map(0, g);
        }
        let chains: Vec<u64> = mapped.iter().copied().filter(|g| g % 50 == 3).collect();
        for &g in &chains {
            map(1, g);
        }
        // A foreign SPTE (not in a shadow page) in the rmap of a hole: aged by the per-rmap walk.
        let foreign = AtomicU64::new(crate::mmu::spte::ACCESSED_MASK | (1 << 11));
        // SAFETY: `foreign` outlives its rmap membership: it is removed below before it is dropped.
        let fp = unsafe { SptePtr::new(&foreign) };
        let hole = slot.0.get(Gfn::new(5), Level::L4K).unwrap();
        let _ = hole.pte_list_add(w.witness(), mmu.rmap_stats(), fp);
        drop(w);
        let sptes = mapped.len() + chains.len() + 1;
        assert_eq!(
            mmu.stats().max_mmu_rmap_size,
            1,
            "the second address space's leaves found one entry in their rmaps"
        );

        let mut got = Vec::new();
        assert!(mmu.age_gfn_range_report(&slot.0, range(0, GFNS), None, |r| got.push(r)));
        let mut want: Vec<GfnRange> = mapped.iter().map(|&g| range(g, g + 1)).collect();
        want.push(range(5, 6));
        want.sort_by_key(|r| r.start());
        assert_eq!(got, want, "one report per young rmap, in gfn order");
        let s = mmu.stats();
        assert_eq!(
            s.accessed_cleared, sptes as u64,
            "every young SPTE cleared once"
        );
        assert_eq!(s.aged_sptes_lockless, sptes as u64, "every SPTE read once");
        // ORDERING: Relaxed: single-threaded test.
        assert_eq!(
            foreign.load(Ordering::Relaxed) & crate::mmu::spte::ACCESSED_MASK,
            0
        );
        got.clear();
        assert!(!mmu.age_gfn_range_report(&slot.0, range(0, GFNS), None, |r| got.push(r)));
        assert!(got.is_empty(), "a second pass finds nothing young: {got:?}");
        assert!(!mmu.age_gfn_range(&slot.0, range(0, GFNS), AgeAction::TestOnly, None));

        let w = lock.write();
        hole.pte_list_remove(w.witness(), mmu.rmap_stats(), fp)
            .unwrap();
        mmu.zap_all(&slot, w.witness()).commit(&NoFlush);
        drop(w);
        drop(roots);
    }

    #[test]
    fn table_order_test_only_stops_at_a_young_leaf_in_the_middle_of_a_run() {
        let mmu = ShadowMmu::new(1);
        let lock = MmuLock::new();
        let slot = SharedSlot(SlotRmaps::new(range(0, GFNS)).unwrap());
        let w = lock.write();
        let root = mmu.get_root(AsId::new(0), w.witness());
        for g in 0..512 {
            let req = MapRequest {
                gfn: Gfn::new(g),
                pfn: Pfn::new(g + 100),
                level: Level::L4K,
                host_writable: true,
                write_fault: false,
                prefetch: false,
            };
            assert_eq!(
                mmu.map(&root, &req, &slot.0, w.witness(), &NoFlush),
                FaultOutcome::Fixed
            );
        }
        drop(w);
        assert!(mmu.age_gfn_range(&slot.0, range(0, 512), AgeAction::Clear, None));
        assert!(!mmu.age_gfn_range(&slot.0, range(0, 512), AgeAction::TestOnly, None));
        // Make gfn 300 young again through its rmap entry.
        let w = lock.write();
        let mut n = 0;
        slot.0
            .get(Gfn::new(300), Level::L4K)
            .unwrap()
            .for_each_spte(w.witness(), mmu.rmap_stats(), |p| {
                n += 1;
                // SAFETY: the slot is live (listed in an rmap while we hold `mmu_lock` write), and
                // its address was exposed when the entry was stored; an atomic OR sets A as a
                // CPU walk does.
                let a = unsafe { &*core::ptr::with_exposed_provenance::<AtomicU64>(p.addr()) };
                // ORDERING: Relaxed: single-threaded test.
                a.fetch_or(crate::mmu::spte::ACCESSED_MASK, Ordering::Relaxed);
            });
        drop(w);
        assert_eq!(n, 1);
        let cleared = mmu.stats().accessed_cleared;
        assert!(mmu.age_gfn_range(&slot.0, range(0, 512), AgeAction::TestOnly, None));
        assert_eq!(
            mmu.stats().accessed_cleared,
            cleared,
            "TestOnly writes nothing"
        );
        let mut got = Vec::new();
        assert!(mmu.age_gfn_range_report(&slot.0, range(0, 512), None, |r| got.push(r)));
        assert_eq!(got, vec![range(300, 301)]);
        let w = lock.write();
        mmu.zap_all(&slot, w.witness()).commit(&NoFlush);
        drop(w);
        drop(root);
    }
}

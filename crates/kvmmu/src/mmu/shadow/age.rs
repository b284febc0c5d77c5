//! Shadow aging through rmaps (`kvm_rmap_age_gfn_range`), with or without `mmu_lock`; the
//! protocol is in [`super`].

use crate::addr::{Gfn, GfnRange, Level};
use crate::sync::witness::MmuWrite;

use super::age_scan::{AgeTally, LevelHeads};
use super::mmu::{ShadowMmu, add};
use super::rmap::AgeAction;
use super::slot_rmaps::{RMAP_LEVELS, SlotRmaps};

impl ShadowMmu {
    /// Ages the rmaps of `gfns` in one slot (`kvm_rmap_age_gfn_range`): per level 4K..1G, per
    /// rmap, lock read-only, clear (or test) Accessed. `start` is rounded down to each level's
    /// alignment so no huge-page rmap is skipped (spec §3.8 analysis). `locked` is the caller's
    /// `mmu_lock` write witness in locked mode (the pre-series baseline), `None` in lockless mode.
    pub fn age_gfn_range(
        &self,
        rmaps: &SlotRmaps,
        gfns: GfnRange,
        action: AgeAction,
        locked: Option<&MmuWrite>,
    ) -> bool {
        self.age_rmaps(rmaps, gfns, action, locked, |_| {})
    }

    /// [`ShadowMmu::age_gfn_range`] with [`AgeAction::Clear`], also calling `young` with the gfns
    /// (clipped to `gfns`) of every rmap found with a young SPTE, once per rmap; the result is true
    /// iff `young` was called.
    #[inline]
    pub fn age_gfn_range_report(
        &self,
        rmaps: &SlotRmaps,
        gfns: GfnRange,
        locked: Option<&MmuWrite>,
        young: impl FnMut(GfnRange),
    ) -> bool {
        self.age_rmaps(rmaps, gfns, AgeAction::Clear, locked, young)
    }

    /// The rmap walk of [`ShadowMmu::age_gfn_range`]; `report` gets each young rmap's gfns.
    /// Per level 4K..1G, the heads touching `gfns` are scanned by [`LevelHeads::age`].
    #[inline]
    fn age_rmaps(
        &self,
        rmaps: &SlotRmaps,
        gfns: GfnRange,
        action: AgeAction,
        locked: Option<&MmuWrite>,
        mut report: impl FnMut(GfnRange),
    ) -> bool {
        if let Some(w) = locked {
            self.check_lock(w.lock_id());
        }
        let stats = &self.inner.rmap_stats;
        let mut tally = AgeTally::default();
        for level in RMAP_LEVELS {
            let scan = level_heads(rmaps, level, gfns);
            let mut young_head = |i: usize| {
                // Head `i` covers one level-aligned block; only its part in `gfns` was asked about.
                let block = GfnRange::from_len(
                    Gfn::new(scan.first + i as u64 * level.pages()),
                    level.pages(),
                );
                if let Some(r) = block.and_then(|b| b.intersect(&gfns)) {
                    report(r);
                }
            };
            if scan
                .age(stats, action, &mut tally, &mut young_head)
                .is_break()
            {
                tally.young = true;
                break;
            }
        }
        let c = &self.inner.counters;
        add(
            if locked.is_some() {
                &c.aged_sptes_locked
            } else {
                &c.aged_sptes_lockless
            },
            tally.visited,
        );
        add(&c.accessed_cleared, tally.cleared);
        tally.young
    }
}

/// The heads of `level` whose blocks intersect `gfns`. The start is rounded down to the level's
/// alignment, so no huge-page rmap is skipped (spec §3.8 analysis).
#[inline]
fn level_heads(rmaps: &SlotRmaps, level: Level, gfns: GfnRange) -> LevelHeads<'_> {
    let (heads, first) = rmaps.level_heads(level, gfns);
    // `broken-rmap-age-no-round-down` (test-only): step `level.pages()` at a time from the
    // unaligned start, as a walk that forgot to round down does: it covers one block per
    // started `level.pages()` gfns and so misses the huge rmap of the block after the start.
    let heads = if cfg!(feature = "broken-rmap-age-no-round-down") {
        let n = (gfns.end().raw() - gfns.start().raw()).div_ceil(level.pages());
        &heads[..heads.len().min(n as usize)]
    } else {
        heads
    };
    LevelHeads {
        heads,
        first,
        level,
    }
}

//! Shadow aging through rmaps (`kvm_rmap_age_gfn_range`), with or without `mmu_lock`; the
//! protocol is in [`super`].

use crate::addr::{Gfn, GfnRange};
use crate::sync::witness::MmuWrite;

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
        let mut young = false;
        let mut visited = 0;
        let mut cleared = 0;
        'levels: for level in RMAP_LEVELS {
            // `broken-rmap-age-no-round-down` (test-only): start at the unaligned gfn, so the
            // walk steps past the huge rmap of the block after the start (spec §3.8 analysis).
            let mut g = if cfg!(feature = "broken-rmap-age-no-round-down") {
                gfns.start().raw()
            } else {
                gfns.start().align_down(level).raw()
            };
            while g < gfns.end().raw() {
                if let Some(r) = rmaps.get(Gfn::new(g), level)
                    && r.age_rmap_counted(stats, action, &mut visited, &mut cleared)
                {
                    young = true;
                    if action == AgeAction::TestOnly {
                        break 'levels;
                    }
                    // The rmap covers the level-aligned block at `g`; only its part in `gfns`
                    // was asked about.
                    let block = GfnRange::from_len(Gfn::new(g), level.pages());
                    if let Some(r) = block.and_then(|b| b.intersect(&gfns)) {
                        report(r);
                    }
                }
                g += level.pages();
            }
        }
        let c = &self.inner.counters;
        add(
            if locked.is_some() {
                &c.aged_sptes_locked
            } else {
                &c.aged_sptes_lockless
            },
            visited,
        );
        add(&c.accessed_cleared, cleared);
        young
    }
}

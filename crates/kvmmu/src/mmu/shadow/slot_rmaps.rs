//! [`SlotRmaps`]: the rmap arrays of one memslot (`slot->arch.rmap[level - 1]`), allocated with the
//! slot when the VM uses the shadow MMU and shared by the slot's INVALID copy (spec §1.6, §3.12).

use crate::addr::{Gfn, GfnRange, Level};

use super::rmap::RmapHead;

/// The levels that have rmaps: 4K, 2M, 1G.
pub const RMAP_LEVELS: [Level; 3] = [Level::L4K, Level::L2M, Level::L1G];

/// One [`RmapHead`] per (level, gfn) of a memslot.
pub struct SlotRmaps {
    /// `[base_gfn, base_gfn + npages)` of the slot.
    gfns: GfnRange,
    /// Per level (4K first), one head per `level.pages()`-aligned block touching the slot.
    levels: [Box<[RmapHead]>; 3],
}

impl core::fmt::Debug for SlotRmaps {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SlotRmaps")
            .field("gfns", &self.gfns)
            .finish_non_exhaustive()
    }
}

/// `gfn_to_index`: the index of `gfn`'s rmap at `level` in a slot starting at `base`.
#[inline]
fn gfn_to_index(gfn: u64, base: u64, level: Level) -> usize {
    let shift = level.pages().trailing_zeros();
    ((gfn >> shift) - (base >> shift)) as usize
}

/// The rmap arrays of a memslot could not be allocated (`memslot_rmap_alloc` failing with
/// `-ENOMEM`); nothing was allocated or changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot allocate the {heads} rmap heads of a memslot of {pages} pages")]
pub struct RmapAllocError {
    /// Pages of the slot.
    pub pages: u64,
    /// Heads that were asked for (all levels).
    pub heads: u64,
}

/// `n` empty heads in one zeroed allocation: the allocator hands out fresh zero pages for a large
/// array (no page is touched until an rmap of it is used), so a huge memslot costs address space,
/// not memory, and an allocation the system refuses is an error, not an abort.
fn zeroed_heads(n: usize) -> Option<Box<[RmapHead]>> {
    if n == 0 {
        return Some(Box::default());
    }
    let layout = std::alloc::Layout::array::<RmapHead>(n).ok()?;
    // SAFETY: `layout` has a non-zero size (n >= 1 and a head is one word).
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<RmapHead>();
    if p.is_null() {
        return None;
    }
    // SAFETY: `p` is a fresh allocation of `layout` (= an array of `n` heads, as a `Box<[_]>`
    // frees it); an all-zero head is a valid, empty one (its only field is an atomic word, and
    // an empty rmap is the value 0 (rmap invariants 1 and 4), which `RmapHead::new` produces).
    Some(unsafe { Box::from_raw(core::ptr::slice_from_raw_parts_mut(p, n)) })
}

impl SlotRmaps {
    /// Empty rmaps for a slot covering `gfns` (`memslot_rmap_alloc`).
    ///
    /// Errors: [`RmapAllocError`] if the arrays cannot be allocated (nothing is kept).
    pub fn new(gfns: GfnRange) -> Result<SlotRmaps, RmapAllocError> {
        let base = gfns.start().raw();
        let last = gfns.end().raw().saturating_sub(1).max(base);
        let counts = RMAP_LEVELS.map(|level| gfn_to_index(last, base, level) + 1);
        let err = RmapAllocError {
            pages: gfns.end().raw() - base,
            heads: counts.iter().map(|&n| n as u64).sum(),
        };
        let [a, b, c] = counts;
        Ok(SlotRmaps {
            gfns,
            levels: [
                zeroed_heads(a).ok_or(err)?,
                zeroed_heads(b).ok_or(err)?,
                zeroed_heads(c).ok_or(err)?,
            ],
        })
    }

    /// The rmap of (`gfn`, `level`) (`gfn_to_rmap`), or `None` if `gfn` is outside the slot or
    /// `level` has no rmaps. A huge-page-aligned `gfn` below the slot start still maps to the
    /// first head of its level, as its block touches the slot.
    #[inline]
    pub fn get(&self, gfn: Gfn, level: Level) -> Option<&RmapHead> {
        let base = self.gfns.start().raw();
        let g = gfn.raw().max(base);
        if gfn.raw() < base.align_down_to(level) || g >= self.gfns.end().raw() {
            return None;
        }
        let li = usize::from(level.get()).checked_sub(1)?;
        self.levels.get(li)?.get(gfn_to_index(g, base, level))
    }

    /// The heads of `level` whose blocks intersect `gfns` (clipped to the slot), in gfn order, with
    /// the first gfn of the first one's block: head `i` of the slice covers the `level`-aligned
    /// block at `first + i * level.pages()`. Empty if nothing of `gfns` is in the slot.
    #[inline]
    pub fn level_heads(&self, level: Level, gfns: GfnRange) -> (&[RmapHead], u64) {
        let base = self.gfns.start().raw();
        let lo = gfns.start().raw().max(base);
        let hi = gfns.end().raw().min(self.gfns.end().raw());
        let Some(heads) = usize::from(level.get())
            .checked_sub(1)
            .and_then(|li| self.levels.get(li))
        else {
            return (&[], 0);
        };
        if lo >= hi {
            return (&[], 0);
        }
        let (a, b) = (
            gfn_to_index(lo, base, level),
            gfn_to_index(hi - 1, base, level) + 1,
        );
        (heads.get(a..b).unwrap_or(&[]), lo.align_down_to(level))
    }
}

/// Heads per 64-byte cache line: the unit of [`first_nonempty`]'s pre-test.
const LINE: usize = 8;

/// The index of the first head of `heads[from..]` that is not empty (`heads.len()` if none).
///
/// Tests a whole cache line of heads at once (the OR of its words) where the line lies inside the
/// slice, so a region of empty rmaps costs one load per head and one branch per line: the scan
/// runs at memory bandwidth, as the TDP MMU's leaf-table pre-test does. The loads are racy hints
/// (`RmapHead::is_empty`): an rmap filled after its load is a mapping made after the walk passed
/// it, as for a locker that reads 0 (rmap invariant 4).
#[inline]
pub fn first_nonempty(heads: &[RmapHead], from: usize) -> usize {
    let mut i = from;
    while i < heads.len() {
        let at_line = heads[i..]
            .as_ptr()
            .addr()
            .is_multiple_of(LINE * core::mem::size_of::<RmapHead>());
        if at_line
            && let Some(line) = heads.get(i..i + LINE)
            && line.iter().fold(0, |acc, h| acc | h.raw_value()) == 0
        {
            i += LINE;
            continue;
        }
        if !heads[i].is_empty() {
            return i;
        }
        i += 1;
    }
    heads.len()
}

/// Rounding helper for raw gfns.
trait AlignDown {
    fn align_down_to(self, level: Level) -> u64;
}

impl AlignDown for u64 {
    #[inline]
    fn align_down_to(self, level: Level) -> u64 {
        self & !(level.pages() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rmap_index_covers_every_level_block_touching_the_slot() {
        // Slot [511, 1025): 4K has 514 heads, 2M blocks 0, 512, 1024 → 3 heads, 1G → 1 head.
        let r = SlotRmaps::new(GfnRange::new(Gfn::new(511), Gfn::new(1025)).unwrap()).unwrap();
        assert_eq!(r.levels[0].len(), 514);
        assert_eq!(r.levels[1].len(), 3);
        assert_eq!(r.levels[2].len(), 1);
        assert!(r.get(Gfn::new(510), Level::L4K).is_none());
        assert!(r.get(Gfn::new(1025), Level::L4K).is_none());
        let a = r.get(Gfn::new(512), Level::L2M).unwrap() as *const RmapHead;
        let b = r.get(Gfn::new(1023), Level::L2M).unwrap() as *const RmapHead;
        assert_eq!(a, b, "one 2M rmap per aligned block");
        // The block of 0..512 touches the slot at 511, so its aligned start finds it.
        assert!(r.get(Gfn::new(0), Level::L2M).is_some());
    }

    #[test]
    fn zeroed_heads_are_empty_and_an_impossible_array_is_refused() {
        let heads = zeroed_heads(3).unwrap();
        assert!(
            heads
                .iter()
                .all(|h| h.raw_value() == RmapHead::new().raw_value())
        );
        assert!(
            zeroed_heads(usize::MAX / 2).is_none(),
            "layout overflow is an error"
        );
        assert!(zeroed_heads(0).unwrap().is_empty());
    }
}

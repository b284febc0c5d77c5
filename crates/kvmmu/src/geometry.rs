//! Page-table geometry, for every layer: how many entries a table has, how many 4 KiB pages one
//! entry at a level maps, and which entry a gfn uses. The TDP tables and the shadow pages share it.
//!
//! 512 entries × 4 levels normally (48-bit guest physical addresses); under `cfg(loom)` 4 entries ×
//! 2 levels, so the model checker explores a tree of a handful of slots.

use crate::addr::Level;

/// Bits of gfn consumed per level.
#[cfg(not(loom))]
pub(crate) const ENT_BITS: u32 = 9;
/// Bits of gfn consumed per level (tiny loom geometry).
#[cfg(loom)]
pub(crate) const ENT_BITS: u32 = 2;

/// Entries per page-table page.
pub(crate) const ENTRIES: usize = 1 << ENT_BITS;

/// Level of a root table.
#[cfg(not(loom))]
pub(crate) const ROOT_LEVEL: Level = Level::ROOT;
/// Level of a root table (tiny loom geometry).
#[cfg(loom)]
pub(crate) const ROOT_LEVEL: Level = Level::L2M;

/// One past the last gfn a root can map (`1 << (ENT_BITS * root level)`): 2^36 normally, i.e. a
/// 48-bit guest physical address space.
pub(crate) const GFN_LIMIT: u64 = 1 << (ENT_BITS * ROOT_LEVEL.get() as u32);

/// Number of 4 KiB pages one entry at `level` maps in this geometry.
#[inline]
pub(crate) const fn pages(level: Level) -> u64 {
    1 << (ENT_BITS * (level.get() as u32 - 1))
}

/// Index of `gfn` in a table at `level`.
#[inline]
pub(crate) const fn index(gfn: u64, level: Level) -> usize {
    ((gfn >> (ENT_BITS * (level.get() as u32 - 1))) as usize) & (ENTRIES - 1)
}

/// `gfn` rounded down to the first gfn mapped by its entry at `level`.
#[inline]
pub(crate) const fn align_down(gfn: u64, level: Level) -> u64 {
    gfn & !(pages(level) - 1)
}

//! Huge pages in the MMUs: the per-level leaf counts (`pages_4k`, `pages_2m`, `pages_1g`, KVM's
//! `kvm_update_page_stats`) and the level arithmetic both MMUs share when they install a huge leaf.
//!
//! The level a fault maps at is decided above the MMU (`vm/fault.rs`: the host mapping level,
//! the memslot's alignment and `disallow_lpage` counts, `kvm_mmu_max_mapping_level`) and passed
//! as [`MapRequest::level`](crate::mmu::MapRequest); an MMU maps at that level or lower (lower
//! when a table already exists where the huge leaf would go: the fault is then served by a 4K
//! leaf inside that table, which is correct, and recovery may later collapse it).
//!
//! Invariant: for each level, `installed - removed` equals the number of present leaves of that
//! level in the MMU (every path that makes a leaf present from non-present counts one install;
//! every path that makes a present leaf non-present counts one removal).

use crate::addr::{Level, Pfn};
use crate::geometry;
use crate::sync::percpu::StripedCounter;

/// Leaves currently installed per level (KVM's VM-wide page stats).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct PageStats {
    /// Present 4K leaves.
    pub pages_4k: u64,
    /// Present 2M leaves.
    pub pages_2m: u64,
    /// Present 1G leaves.
    pub pages_1g: u64,
}

impl PageStats {
    /// The sum of two MMUs' counts.
    pub fn plus(self, o: PageStats) -> PageStats {
        PageStats {
            pages_4k: self.pages_4k + o.pages_4k,
            pages_2m: self.pages_2m + o.pages_2m,
            pages_1g: self.pages_1g + o.pages_1g,
        }
    }
}

/// Monotonic install/remove counters per leaf level (invariant above).
#[derive(Default)]
pub(crate) struct PageCounts {
    installed: [StripedCounter; 3],
    removed: [StripedCounter; 3],
}

impl core::fmt::Debug for PageCounts {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        self.snapshot().fmt(f)
    }
}

fn slot(level: Level) -> usize {
    (usize::from(level.get()) - 1).min(2)
}

impl PageCounts {
    /// A leaf of `level` became present.
    #[inline]
    pub(crate) fn install(&self, level: Level) {
        self.installed[slot(level)].add(1);
    }

    /// `n` present leaves of `level` became non-present.
    #[inline]
    pub(crate) fn remove(&self, level: Level, n: u64) {
        if n != 0 {
            self.removed[slot(level)].add(n);
        }
    }

    /// The counts now (exact when no install or removal is in flight).
    pub(crate) fn snapshot(&self) -> PageStats {
        let c = |i: usize| {
            self.installed[i]
                .sum()
                .saturating_sub(self.removed[i].sum())
        };
        PageStats {
            pages_4k: c(0),
            pages_2m: c(1),
            pages_1g: c(2),
        }
    }
}

/// The largest level an MMU may install a leaf at (1G, or below the root in the loom geometry).
pub(crate) fn max_leaf_level() -> Level {
    let below_root = geometry::ROOT_LEVEL.down().unwrap_or(Level::L4K);
    if below_root > Level::L1G {
        Level::L1G
    } else {
        below_root
    }
}

/// The first frame of the `level` leaf that maps `gfn` to `pfn` (the request names the 4K frame
/// of `gfn`; the caller checked that host and memslot map the whole block contiguously).
#[inline]
pub(crate) fn leaf_pfn(gfn: u64, pfn: Pfn, level: Level) -> Pfn {
    Pfn::new(pfn.raw() - (gfn - geometry::align_down(gfn, level)))
}

/// The 4K frame `gfn` reaches through a leaf of `level` starting at `base` (the simulated CPU's
/// address computation for a huge leaf).
#[inline]
pub(crate) fn frame_in_leaf(gfn: u64, base: Pfn, level: Level) -> Pfn {
    Pfn::new(base.raw() + (gfn - geometry::align_down(gfn, level)))
}

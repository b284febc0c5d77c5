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
#[cfg(not(loom))]
use crate::sync::percpu::StripedCounter;

/// A plain counter under loom (`sync/percpu.rs` is not modelled): same interface.
#[cfg(loom)]
struct StripedCounter(crate::sync::atomic::AtomicU64);

#[cfg(loom)]
impl Default for StripedCounter {
    fn default() -> Self {
        StripedCounter(crate::sync::atomic::AtomicU64::new(0))
    }
}

#[cfg(loom)]
impl StripedCounter {
    fn add(&self, n: u64) {
        // ORDERING: Relaxed: a statistic.
        self.0.fetch_add(n, crate::sync::atomic::Ordering::Relaxed);
    }
    fn add_nonzero(&self, n: u64) {
        if n != 0 {
            self.add(n);
        }
    }
    fn sum(&self) -> u64 {
        // ORDERING: Relaxed: a statistic.
        self.0.load(crate::sync::atomic::Ordering::Relaxed)
    }
}

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

/// Monotonic install/remove counters per leaf level (invariant above), and the MMU's NX huge
/// pages switch (`nx_huge_pages`: huge leaves are installed without the X bit, so that an
/// instruction fetch through one faults and is served by 4K leaves; `mmu/nx_huge.rs`).
#[derive(Default)]
pub(crate) struct PageCounts {
    installed: [StripedCounter; 3],
    removed: [StripedCounter; 3],
    nx_huge: crate::sync::atomic::AtomicBool,
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

    /// `n` leaves of `level` became present at once (a split's table of children): one add.
    #[inline]
    pub(crate) fn install_n(&self, level: Level, n: u64) {
        self.installed[slot(level)].add_nonzero(n);
    }

    /// Leaves ever installed, all levels together (monotonic; exact when no install is in
    /// flight). The TDP MMU derives its `leaves_installed` from it, so that a fault's install
    /// bumps one counter, not two.
    pub(crate) fn installed_total(&self) -> u64 {
        self.installed.iter().map(StripedCounter::sum).sum()
    }

    /// `n` present leaves of `level` became non-present.
    #[inline]
    pub(crate) fn remove(&self, level: Level, n: u64) {
        if n != 0 {
            self.removed[slot(level)].add(n);
        }
    }

    /// Turns the NX huge pages mitigation on or off for the leaves installed from now on.
    pub(crate) fn set_nx_huge(&self, on: bool) {
        // ORDERING: Relaxed: a configuration switch, set before the VM runs; a fault that reads
        // the old value installs a leaf that was correct under that value.
        self.nx_huge
            .store(on, crate::sync::atomic::Ordering::Relaxed);
    }

    /// The leaf `spte` of `level` as the MMU installs it: without X if it is huge and the NX
    /// huge pages mitigation is on (`make_spte`'s `is_nx_huge_page_enabled` case).
    #[inline]
    pub(crate) fn nx_adjust(
        &self,
        spte: crate::mmu::spte::Spte,
        level: Level,
    ) -> crate::mmu::spte::Spte {
        // ORDERING: Relaxed, as in `set_nx_huge`.
        if level > Level::L4K && self.nx_huge.load(crate::sync::atomic::Ordering::Relaxed) {
            crate::mmu::spte::Spte::from_raw(spte.raw() & !crate::mmu::spte::EXECUTABLE_MASK)
        } else {
            spte
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

/// The largest level an MMU may install a leaf at: 1G. In the tiny loom geometry (4 entries x 2
/// levels) the root's entries may hold huge leaves themselves, so that a model can split one.
pub(crate) fn max_leaf_level() -> Level {
    if cfg!(loom) {
        return geometry::ROOT_LEVEL;
    }
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

/// The SPTE of child `i` when a huge leaf `huge` at `level` is split into a table of leaves one
/// level down (`make_small_spte` / `make_huge_page_split_spte`): every bit of the huge leaf —
/// permissions, host/MMU-writable, Accessed and Dirty — is inherited, the pfn advances by the
/// child's span, and the PS bit stays only if the child is itself huge. A 4K child is executable
/// (the NX huge pages mitigation concerns huge leaves only; every leaf this MMU builds grants X
/// otherwise), as `make_huge_page_split_spte` makes it.
#[inline]
pub(crate) fn split_child_spte(
    huge: crate::mmu::spte::Spte,
    level: Level,
    i: usize,
) -> crate::mmu::spte::Spte {
    use crate::mmu::spte::{BASE_ADDR_MASK, EXECUTABLE_MASK, PAGE_SIZE_MASK, Spte};
    let child = level.down().unwrap_or(Level::L4K);
    let pfn = huge.pfn().raw() + i as u64 * geometry::pages(child);
    let mut raw = (huge.raw() & !BASE_ADDR_MASK) | ((pfn << 12) & BASE_ADDR_MASK);
    if child == Level::L4K {
        raw = (raw & !PAGE_SIZE_MASK) | EXECUTABLE_MASK;
    }
    Spte::from_raw(raw)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::mmu::spte::{LeafAttrs, SpteKind, make_spte};

    #[test]
    fn split_children_inherit_every_bit_but_the_pfn_and_the_4k_ps_bit() {
        let attrs = LeafAttrs {
            host_writable: true,
            write_allowed: true,
            prefetch: false,
        };
        let huge = make_spte(Pfn::new(1024), Level::L2M, attrs);
        for i in [0usize, 1, 511] {
            let c = split_child_spte(huge, Level::L2M, i);
            assert_eq!(c.kind(Level::L4K), SpteKind::Leaf);
            assert_eq!(c.pfn(), Pfn::new(1024 + i as u64));
            assert_eq!(
                (
                    c.is_writable(),
                    c.is_accessed(),
                    c.is_dirty(),
                    c.is_host_writable()
                ),
                (true, true, true, true)
            );
            assert_eq!(c.raw() & (1 << 7), 0, "no PS bit at 4K");
        }
        let g = make_spte(Pfn::new(1 << 18), Level::L1G, attrs);
        let c = split_child_spte(g, Level::L1G, 3);
        assert_eq!(c.kind(Level::L2M), SpteKind::Leaf, "a 2M child stays huge");
        assert_eq!(c.pfn(), Pfn::new((1 << 18) + 3 * 512));
    }
}

//! The host page table: a sparse radix tree of host PTEs, allocated on first touch.
//!
//! Protocol (Linux's `pgd → pud → pmd → pte` tables, as the primary MMU keeps them):
//! - One table per address space, indexed by page number (`hva >> 12`). Four levels of 512
//!   entries: a leaf ([`Leaf`]) holds the PTE words of 512 pages (2 MiB), each directory level
//!   multiplies the span by 512; the root spans 2^36 pages, more than [`super::TASK_SIZE`].
//! - A directory entry is empty until a GUP faults a page of its span in
//!   ([`PageTable::entry_or_alloc`], under `mmap_lock` read): the child is allocated all-zero and
//!   installed once ([`OnceLock`]), so racing GUPs agree on one child.
//! - Every range operation ([`PageTable::for_each_leaf`]) descends only into allocated children:
//!   zapping, protecting or aging a range nobody touched reads a handful of directory entries and
//!   writes nothing, whatever its length.
//! - Tables are freed only through `&mut` ([`PageTable::prune`], after `munmap` cleared the
//!   range's PTEs), i.e. under `mmap_lock` write, when no reader can hold a reference into them.
//!
//! Invariants:
//! 1. A page whose leaf is not allocated has PTE 0 (not present), so a missing table and a zero
//!    word mean the same thing to every reader.
//! 2. A table, once installed, stays installed until `prune` takes it with exclusive access;
//!    `prune` frees only tables all of whose PTEs are 0, so it never changes a PTE's value.
//! 3. `bytes` equals the size of every table allocated and not yet freed.
//! 4. Huge entries: each leaf also holds the huge marker of its 2 MiB span (Linux's PMD entry
//!    pointing at a huge page instead of a PTE table): 0 for 4K pages, else the host mapping
//!    level (2 = 2 MiB, 3 = 1 GiB; a 1 GiB page sets the marker of each of its 512 spans). A
//!    marker is non-zero only while every PTE of its span is present and names the frame run of
//!    one huge page (frame `first + i` for page `head + i`); the per-page PTE words keep the
//!    frame, young and dirty bits, so every 4K reader works unchanged. Markers change only under
//!    the huge-fault mutex (set, host `huge.rs`) or `mmap_lock` write (cleared on split or zap).

use core::ops::ControlFlow;
use std::sync::OnceLock;

use crate::sync::atomic::{AtomicU64, Ordering};

/// Entries per table (every level).
const FAN: usize = 512;
/// log2 of [`FAN`].
const FAN_SHIFT: u32 = 9;

/// One level of the tree: a leaf of PTE words or a directory of children.
trait Table: Sized + Send + Sync {
    /// log2 of the number of pages one table of this level spans.
    const SPAN_SHIFT: u32;
    /// A new all-empty table.
    fn new_boxed() -> Box<Self>;
    /// The PTE of `page` (relative to this table's first page), if its leaf exists.
    fn entry(&self, page: u64) -> Option<&AtomicU64>;
    /// The PTE of `page`, allocating missing tables on the way (adding their size to `bytes`).
    fn entry_or_alloc(&self, page: u64, bytes: &AtomicU64) -> &AtomicU64;
    /// Calls `f` with every allocated leaf's PTEs in `[s, e)` (page numbers; this table starts at
    /// `base`), in address order, with the page number of the slice's first entry.
    fn for_each_leaf<'a, F>(&'a self, base: u64, s: u64, e: u64, f: &mut F) -> ControlFlow<()>
    where
        F: FnMut(u64, &'a [AtomicU64], &'a AtomicU64) -> ControlFlow<()>;
    /// The huge marker of the leaf holding `page`, if that leaf exists.
    fn marker(&self, page: u64) -> Option<&AtomicU64>;
    /// The huge marker of the leaf holding `page`, allocating missing tables.
    fn marker_or_alloc(&self, page: u64, bytes: &AtomicU64) -> &AtomicU64;
    /// Frees the empty tables below this one that intersect `[s, e)`; returns the bytes freed.
    fn prune(&mut self, base: u64, s: u64, e: u64) -> u64;
    /// True if nothing below this table is allocated (directory) or no PTE is set (leaf).
    fn is_empty(&self) -> bool;
}

/// The last level: the PTE words of 512 consecutive pages, and the huge marker of their 2 MiB
/// span (invariant 4).
struct Leaf {
    ptes: [AtomicU64; FAN],
    huge: AtomicU64,
}

impl Table for Leaf {
    const SPAN_SHIFT: u32 = FAN_SHIFT;

    fn new_boxed() -> Box<Self> {
        Box::new(Leaf {
            ptes: core::array::from_fn(|_| AtomicU64::new(0)),
            huge: AtomicU64::new(0),
        })
    }

    #[inline]
    fn entry(&self, page: u64) -> Option<&AtomicU64> {
        self.ptes.get(page as usize)
    }

    #[inline]
    fn entry_or_alloc(&self, page: u64, _: &AtomicU64) -> &AtomicU64 {
        &self.ptes[page as usize]
    }

    fn for_each_leaf<'a, F>(&'a self, base: u64, s: u64, e: u64, f: &mut F) -> ControlFlow<()>
    where
        F: FnMut(u64, &'a [AtomicU64], &'a AtomicU64) -> ControlFlow<()>,
    {
        let lo = s.max(base) - base;
        let hi = (e - base).min(FAN as u64);
        f(base + lo, &self.ptes[lo as usize..hi as usize], &self.huge)
    }

    #[inline]
    fn marker(&self, _: u64) -> Option<&AtomicU64> {
        Some(&self.huge)
    }

    #[inline]
    fn marker_or_alloc(&self, _: u64, _: &AtomicU64) -> &AtomicU64 {
        &self.huge
    }

    fn prune(&mut self, _: u64, _: u64, _: u64) -> u64 {
        0
    }

    fn is_empty(&self) -> bool {
        // ORDERING: Relaxed: called with exclusive access (`&mut` of the tree, invariant 2).
        self.huge.load(Ordering::Relaxed) == 0
            && self.ptes.iter().all(|w| w.load(Ordering::Relaxed) == 0)
    }
}

/// A directory level: 512 children, each allocated on first touch.
struct Dir<C> {
    children: [OnceLock<Box<C>>; FAN],
}

impl<C: Table> Dir<C> {
    /// The indexes of the children intersecting `[s, e)` for a directory starting at `base`
    /// (`s < e`, and the range intersects the directory's span).
    fn child_indexes(base: u64, s: u64, e: u64) -> core::ops::RangeInclusive<usize> {
        let first = (s.max(base) - base) >> C::SPAN_SHIFT;
        let last = ((e - base - 1) >> C::SPAN_SHIFT).min(FAN as u64 - 1);
        first as usize..=last as usize
    }
}

impl<C: Table> Table for Dir<C> {
    const SPAN_SHIFT: u32 = C::SPAN_SHIFT + FAN_SHIFT;

    fn new_boxed() -> Box<Self> {
        Box::new(Dir {
            children: core::array::from_fn(|_| OnceLock::new()),
        })
    }

    #[inline]
    fn entry(&self, page: u64) -> Option<&AtomicU64> {
        let child = self.children.get((page >> C::SPAN_SHIFT) as usize)?.get()?;
        child.entry(page & ((1 << C::SPAN_SHIFT) - 1))
    }

    #[inline]
    fn entry_or_alloc(&self, page: u64, bytes: &AtomicU64) -> &AtomicU64 {
        let child = self.children[(page >> C::SPAN_SHIFT) as usize].get_or_init(|| {
            // ORDERING: Relaxed: a statistic; only the winning initialiser runs this.
            bytes.fetch_add(size_of::<C>() as u64, Ordering::Relaxed);
            C::new_boxed()
        });
        child.entry_or_alloc(page & ((1 << C::SPAN_SHIFT) - 1), bytes)
    }

    #[inline]
    fn marker(&self, page: u64) -> Option<&AtomicU64> {
        let child = self.children.get((page >> C::SPAN_SHIFT) as usize)?.get()?;
        child.marker(page & ((1 << C::SPAN_SHIFT) - 1))
    }

    #[inline]
    fn marker_or_alloc(&self, page: u64, bytes: &AtomicU64) -> &AtomicU64 {
        let child = self.children[(page >> C::SPAN_SHIFT) as usize].get_or_init(|| {
            // ORDERING: Relaxed: a statistic; only the winning initialiser runs this.
            bytes.fetch_add(size_of::<C>() as u64, Ordering::Relaxed);
            C::new_boxed()
        });
        child.marker_or_alloc(page & ((1 << C::SPAN_SHIFT) - 1), bytes)
    }

    fn for_each_leaf<'a, F>(&'a self, base: u64, s: u64, e: u64, f: &mut F) -> ControlFlow<()>
    where
        F: FnMut(u64, &'a [AtomicU64], &'a AtomicU64) -> ControlFlow<()>,
    {
        for i in Self::child_indexes(base, s, e) {
            if let Some(c) = self.children[i].get() {
                c.for_each_leaf(base + ((i as u64) << C::SPAN_SHIFT), s, e, f)?;
            }
        }
        ControlFlow::Continue(())
    }

    fn prune(&mut self, base: u64, s: u64, e: u64) -> u64 {
        let mut freed = 0;
        for i in Self::child_indexes(base, s, e) {
            let slot = &mut self.children[i];
            let Some(c) = slot.get_mut() else { continue };
            freed += c.prune(base + ((i as u64) << C::SPAN_SHIFT), s, e);
            if c.is_empty() {
                drop(slot.take());
                freed += size_of::<C>() as u64;
            }
        }
        freed
    }

    fn is_empty(&self) -> bool {
        self.children.iter().all(|c| c.get().is_none())
    }
}

/// Root level: spans 2^36 pages.
type Root = Dir<Dir<Dir<Leaf>>>;

/// One address space's host PTEs (module doc).
pub(crate) struct PageTable {
    root: Box<Root>,
    /// Bytes of tables allocated now, the root included (invariant 3).
    bytes: AtomicU64,
}

impl Default for PageTable {
    fn default() -> Self {
        PageTable {
            root: Root::new_boxed(),
            bytes: AtomicU64::new(size_of::<Root>() as u64),
        }
    }
}

impl core::fmt::Debug for PageTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PageTable")
            .field("bytes", &self.bytes())
            .finish()
    }
}

impl PageTable {
    /// The PTE of `page` if its leaf exists; `None` means PTE 0 (invariant 1).
    #[inline]
    pub(crate) fn entry(&self, page: u64) -> Option<&AtomicU64> {
        if page >> Root::SPAN_SHIFT != 0 {
            return None;
        }
        self.root.entry(page)
    }

    /// The PTE of `page` (below 2^36), allocating its tables if needed (GUP's first touch).
    #[inline]
    pub(crate) fn entry_or_alloc(&self, page: u64) -> &AtomicU64 {
        debug_assert!(
            page >> Root::SPAN_SHIFT == 0,
            "page {page:#x} beyond the table"
        );
        self.root.entry_or_alloc(page, &self.bytes)
    }

    /// Calls `f` with the PTEs of every allocated leaf in pages `[s, e)`, in address order, each
    /// slice with the page number of its first entry; stops when `f` breaks. Unallocated spans
    /// cost nothing (their PTEs are 0, invariant 1).
    #[inline]
    pub(crate) fn for_each_leaf<'a>(
        &'a self,
        s: u64,
        e: u64,
        mut f: impl FnMut(u64, &'a [AtomicU64]) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        self.for_each_leaf_huge(s, e, |first, ptes, _| f(first, ptes))
    }

    /// As [`PageTable::for_each_leaf`], also passing each leaf's huge marker (invariant 4).
    #[inline]
    pub(crate) fn for_each_leaf_huge<'a>(
        &'a self,
        s: u64,
        e: u64,
        mut f: impl FnMut(u64, &'a [AtomicU64], &'a AtomicU64) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let e = e.min(1 << Root::SPAN_SHIFT);
        if s >= e {
            return ControlFlow::Continue(());
        }
        self.root.for_each_leaf(0, s, e, &mut f)
    }

    /// The huge marker of the 2 MiB span holding `page` (invariant 4), if its leaf exists.
    #[inline]
    pub(crate) fn huge_marker(&self, page: u64) -> Option<&AtomicU64> {
        if page >> Root::SPAN_SHIFT != 0 {
            return None;
        }
        self.root.marker(page)
    }

    /// The huge marker of the 2 MiB span holding `page` (below 2^36), allocating its tables.
    #[inline]
    pub(crate) fn huge_marker_or_alloc(&self, page: u64) -> &AtomicU64 {
        debug_assert!(page >> Root::SPAN_SHIFT == 0);
        self.root.marker_or_alloc(page, &self.bytes)
    }

    /// Frees every table intersecting pages `[s, e)` whose PTEs are all 0 (and directories left
    /// empty by that). Exclusive access: no reader holds a PTE reference (invariant 2).
    pub(crate) fn prune(&mut self, s: u64, e: u64) {
        let e = e.min(1 << Root::SPAN_SHIFT);
        if s >= e {
            return;
        }
        let freed = self.root.prune(0, s, e);
        // ORDERING: Relaxed: a statistic, changed under exclusive access.
        self.bytes.fetch_sub(freed, Ordering::Relaxed);
    }

    /// Bytes of page tables allocated now (the root included).
    pub(crate) fn bytes(&self) -> u64 {
        // ORDERING: Relaxed: a statistic.
        self.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn present(t: &PageTable, s: u64, e: u64) -> Vec<u64> {
        let mut v = Vec::new();
        let _ = t.for_each_leaf(s, e, |first, ptes| {
            for (i, w) in ptes.iter().enumerate() {
                if w.load(Ordering::Relaxed) != 0 {
                    v.push(first + i as u64);
                }
            }
            ControlFlow::Continue(())
        });
        v
    }

    #[test]
    fn untouched_pages_have_no_tables_and_read_as_zero() {
        let t = PageTable::default();
        let root = t.bytes();
        assert!(t.entry(12345).is_none());
        assert!(present(&t, 0, 1 << 31).is_empty());
        assert_eq!(t.bytes(), root, "reading allocates nothing");
    }

    #[test]
    fn a_touch_allocates_one_path_and_walks_find_exactly_the_set_entries() {
        let mut t = PageTable::default();
        let root = t.bytes();
        let pages = [0u64, 511, 512, (1 << 27) + 3, (1 << 31) - 1];
        for p in pages {
            t.entry_or_alloc(p).store(p + 1, Ordering::Relaxed);
        }
        assert_eq!(present(&t, 0, 1 << 31), pages);
        assert_eq!(present(&t, 1, 512), [511]);
        assert_eq!(present(&t, 512, 513), [512]);
        assert_eq!(t.entry(511).map(|w| w.load(Ordering::Relaxed)), Some(512));
        let leaves = t.bytes() - root;
        // Pages 0/511 share a leaf, 512 has its own, the last two their own paths.
        assert_eq!(
            leaves,
            4 * size_of::<Leaf>() as u64
                + 3 * size_of::<Dir<Leaf>>() as u64
                + 3 * size_of::<Dir<Dir<Leaf>>>() as u64
        );
        // Pruning frees nothing that still holds a PTE; zeroed tables go.
        t.prune(0, 1 << 31);
        assert_eq!(t.bytes() - root, leaves);
        for p in pages {
            t.entry(p).expect("allocated").store(0, Ordering::Relaxed);
        }
        t.prune(0, 1 << 31);
        assert_eq!(t.bytes(), root, "every table but the root freed");
        assert!(t.entry(512).is_none());
    }

    #[test]
    fn a_walk_stops_when_the_callback_breaks() {
        let t = PageTable::default();
        t.entry_or_alloc(3).store(1, Ordering::Relaxed);
        t.entry_or_alloc(5000).store(1, Ordering::Relaxed);
        let mut calls = 0;
        let r = t.for_each_leaf(0, 1 << 20, |_, _| {
            calls += 1;
            ControlFlow::Break(())
        });
        assert_eq!((r, calls), (ControlFlow::Break(()), 1));
    }
}

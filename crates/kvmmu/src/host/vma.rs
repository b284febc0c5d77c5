//! Virtual memory areas and the host page table they share.
//!
//! A [`Vma`] is a page range `[start, end)` with a protection. The host PTEs of every VMA live in
//! one sparse [`PageTable`] of the address space (allocated on first touch), so splitting a VMA
//! (partial `munmap`/`mprotect`) never copies or moves a PTE, and a range nobody touched has no
//! table at all.
//!
//! Host PTE word layout: bit 0 present, bit 1 young, bit 2 dirty, bits 3..32 pfn, bits 32..64
//! the generation of the frame's tag (the tag's host page is the PTE's own page).
//!
//! Invariants:
//! 1. The PTE of a page outside every VMA is 0 (`munmap` clears a range before removing it).
//! 2. A non-present PTE is exactly 0 or a swap entry (`swap` module: bit 63, no present, young or
//!    dirty bit); aging never touches a non-present PTE; removal swaps to 0.
//! 3. VMAs in a [`Vmas`] never overlap.

use std::collections::BTreeMap;

use super::Prot;
use super::frames::FrameTag;
use super::pgtable::PageTable;
use crate::addr::{Hva, PAGE_SHIFT, Pfn};

/// Host PTE bits.
pub(crate) mod pte {
    /// The page is present.
    pub(crate) const PRESENT: u64 = 1 << 0;
    /// The page was accessed since the last clear.
    pub(crate) const YOUNG: u64 = 1 << 1;
    /// The page was written since it was faulted in.
    pub(crate) const DIRTY: u64 = 1 << 2;
    const PFN_SHIFT: u32 = 3;
    const PFN_MASK: u64 = (1 << 29) - 1;

    /// A present PTE for frame `pfn` whose tag has generation `generation`.
    pub(crate) const fn encode(pfn: u64, generation: u32, flags: u64) -> u64 {
        PRESENT | flags | ((pfn & PFN_MASK) << PFN_SHIFT) | ((generation as u64) << 32)
    }
    /// The frame of a present PTE.
    pub(crate) const fn pfn(v: u64) -> u64 {
        (v >> PFN_SHIFT) & PFN_MASK
    }
    /// The tag generation of a present PTE.
    pub(crate) const fn generation(v: u64) -> u32 {
        (v >> 32) as u32
    }
}

/// The frame and tag a present PTE word for `page` names.
pub(crate) fn pte_frame(page: u64, v: u64) -> (Pfn, FrameTag) {
    (
        Pfn::new(pte::pfn(v)),
        FrameTag::from_parts(page, pte::generation(v)),
    )
}

/// One mapping.
#[derive(Clone, Debug)]
pub(crate) struct Vma {
    /// First page (`hva >> 12`).
    pub(crate) start: u64,
    /// One past the last page.
    pub(crate) end: u64,
    pub(crate) prot: Prot,
    /// How the mapping may be backed by huge pages (`huge.rs`).
    pub(crate) huge: super::huge::HugeMode,
}

impl Vma {
    /// A VMA of pages `[start, end)`; its PTEs are 0 (invariant 1).
    pub(crate) fn new(start: u64, end: u64, prot: Prot) -> Vma {
        Vma {
            start,
            end,
            prot,
            huge: super::huge::HugeMode::None,
        }
    }

    /// True if the VMA allows reads (x86: a writable mapping is readable).
    #[inline]
    pub(crate) fn readable(&self) -> bool {
        self.prot.intersects(Prot::READ | Prot::WRITE)
    }

    /// True if the VMA allows writes.
    #[inline]
    pub(crate) fn writable(&self) -> bool {
        self.prot.contains(Prot::WRITE)
    }
}

/// The VMAs of an address space, keyed by first page, and its host page table.
#[derive(Default, Debug)]
pub(crate) struct Vmas {
    map: BTreeMap<u64, Vma>,
    /// The host PTEs of every VMA (invariant 1).
    pub(crate) pt: PageTable,
}

impl Vmas {
    /// The VMA containing `page`.
    #[inline]
    pub(crate) fn find(&self, page: u64) -> Option<&Vma> {
        self.map
            .range(..=page)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| page < v.end)
    }

    /// VMAs intersecting `[s, e)`, in address order.
    pub(crate) fn overlapping(&self, s: u64, e: u64) -> impl Iterator<Item = &Vma> {
        let from = self.find(s).map_or(s, |v| v.start);
        self.map.range(from..e.max(from)).map(|(_, v)| v)
    }

    /// The first page of `[s, e)` no VMA covers, if any.
    pub(crate) fn first_hole(&self, s: u64, e: u64) -> Option<u64> {
        let mut next = s;
        for v in self.overlapping(s, e) {
            if v.start > next {
                return Some(next);
            }
            next = v.end;
            if next >= e {
                return None;
            }
        }
        (next < e).then_some(next)
    }

    /// Some VMA intersecting `[s, e)`.
    pub(crate) fn first_overlap(&self, s: u64, e: u64) -> Option<&Vma> {
        self.overlapping(s, e).next()
    }

    /// Splits the VMA containing `page` at `page` if `page` is strictly inside it.
    pub(crate) fn split_at(&mut self, page: u64) {
        let Some(v) = self.find(page) else { return };
        if v.start == page {
            return;
        }
        let lo_start = v.start;
        let mut hi = v.clone();
        hi.start = page;
        if let Some(lo) = self.map.get_mut(&lo_start) {
            lo.end = page;
        }
        self.map.insert(page, hi);
    }

    /// Inserts a VMA (the caller checked it overlaps nothing, invariant 3).
    pub(crate) fn insert(&mut self, v: Vma) {
        debug_assert!(self.first_overlap(v.start, v.end).is_none());
        self.map.insert(v.start, v);
    }

    /// Removes and returns the VMAs starting in `[s, e)` (split first so they lie inside it).
    pub(crate) fn remove_range(&mut self, s: u64, e: u64) -> Vec<Vma> {
        let keys: Vec<u64> = self.map.range(s..e).map(|(k, _)| *k).collect();
        keys.into_iter()
            .filter_map(|k| self.map.remove(&k))
            .collect()
    }

    /// Mutable access to the VMAs starting in `[s, e)`.
    pub(crate) fn range_mut(&mut self, s: u64, e: u64) -> impl Iterator<Item = &mut Vma> {
        self.map.range_mut(s..e).map(|(_, v)| v)
    }

    /// Removes every VMA.
    pub(crate) fn take_all(&mut self) -> Vec<Vma> {
        core::mem::take(&mut self.map).into_values().collect()
    }

    /// All VMAs in address order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Vma> {
        self.map.values()
    }

    /// First-fit search for `npages` free pages in `[lo, hi)`, leaving `guard` free pages on
    /// both sides and starting at a multiple of `align` pages.
    pub(crate) fn find_gap(
        &self,
        npages: u64,
        lo: u64,
        hi: u64,
        guard: u64,
        align: u64,
    ) -> Option<u64> {
        let align_up = |p: u64| p.checked_add(align - 1).map(|x| x & !(align - 1));
        let mut cand = align_up(lo)?;
        for v in self.map.range(..hi).map(|(_, v)| v) {
            if v.end.saturating_add(guard) <= cand {
                continue;
            }
            if cand.checked_add(npages)?.checked_add(guard)? <= v.start {
                break;
            }
            cand = align_up(v.end.checked_add(guard)?)?;
        }
        (cand.checked_add(npages)? <= hi).then_some(cand)
    }
}

/// The address of page `page`.
pub(crate) const fn page_hva(page: u64) -> Hva {
    Hva::new(page << PAGE_SHIFT)
}

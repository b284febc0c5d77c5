//! Address and unit newtypes.
//!
//! Every address that crosses an API is one of these types, never a bare `u64`: a guest physical
//! address ([`Gpa`]), a guest frame number ([`Gfn`]), a host virtual address ([`Hva`]) or a host
//! frame ([`Pfn`], an index into the simulated physical memory). Arithmetic is checked: the
//! methods return `None` instead of wrapping, so a range that would overflow is rejected where it is
//! built, not discovered later as a corrupted translation.

use core::fmt;

/// log2 of the base page size (4 KiB).
pub const PAGE_SHIFT: u32 = 12;
/// The base page size in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Number of entries in one page-table page.
pub const SPTE_ENT_PER_PAGE: usize = 512;
/// Bits of index consumed per page-table level.
pub const LEVEL_BITS: u32 = 9;

/// Returns true if `v` is a multiple of [`PAGE_SIZE`].
pub const fn is_page_aligned(v: u64) -> bool {
    v & (PAGE_SIZE - 1) == 0
}

macro_rules! addr_newtype {
    ($(#[$m:meta])* $name:ident, $fmt:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(u64);

        impl $name {
            /// Wraps a raw value.
            pub const fn new(raw: u64) -> Self {
                Self(raw)
            }
            /// The raw value.
            pub const fn raw(self) -> u64 {
                self.0
            }
            /// `self + n`, or `None` on overflow.
            pub const fn checked_add(self, n: u64) -> Option<Self> {
                match self.0.checked_add(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
            /// `self - n`, or `None` on underflow.
            pub const fn checked_sub(self, n: u64) -> Option<Self> {
                match self.0.checked_sub(n) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
            /// The distance from `base` up to `self`, or `None` if `self < base`.
            pub const fn offset_from(self, base: Self) -> Option<u64> {
                self.0.checked_sub(base.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "(", $fmt, ")"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}

addr_newtype!(
    /// A guest physical address.
    Gpa,
    "{:#x}"
);
addr_newtype!(
    /// A guest frame number: a guest physical address shifted right by [`PAGE_SHIFT`].
    Gfn,
    "{:#x}"
);
addr_newtype!(
    /// A host virtual address in a [`crate::host::HostMm`] address space.
    Hva,
    "{:#x}"
);
addr_newtype!(
    /// A host frame: the index of a 4 KiB frame in the simulated physical memory.
    Pfn,
    "{}"
);

impl Gpa {
    /// The guest frame containing this address.
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
    /// Offset of this address within its page.
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }
    /// True if the address is 4 KiB aligned.
    pub const fn is_page_aligned(self) -> bool {
        is_page_aligned(self.0)
    }
}

impl Gfn {
    /// The first guest physical address of this frame, or `None` if it does not fit in 64 bits.
    pub const fn gpa(self) -> Option<Gpa> {
        if self.0 > (u64::MAX >> PAGE_SHIFT) {
            None
        } else {
            Some(Gpa(self.0 << PAGE_SHIFT))
        }
    }
    /// Rounds down to the first gfn mapped by one entry at `level`.
    pub const fn align_down(self, level: Level) -> Gfn {
        Gfn(self.0 & !(level.pages() - 1))
    }
    /// Index of this gfn in a page table at `level` (bits `9*(level-1) .. 9*level`).
    pub const fn index_at(self, level: Level) -> usize {
        ((self.0 >> (LEVEL_BITS * (level.0 as u32 - 1))) & (SPTE_ENT_PER_PAGE as u64 - 1)) as usize
    }
}

impl Hva {
    /// True if the address is 4 KiB aligned.
    pub const fn is_page_aligned(self) -> bool {
        is_page_aligned(self.0)
    }
    /// Host page number (`hva >> 12`).
    pub const fn page(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }
}

impl Pfn {
    /// The frame's index as a `usize`, for indexing the arena.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// A page-table level: 4K = 1, 2M = 2, 1G = 3, root = 4.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Level(u8);

impl Level {
    /// A 4 KiB leaf.
    pub const L4K: Level = Level(1);
    /// A 2 MiB leaf (or the table holding 4 KiB leaves).
    pub const L2M: Level = Level(2);
    /// A 1 GiB leaf.
    pub const L1G: Level = Level(3);
    /// The root of a 4-level table.
    pub const ROOT: Level = Level(4);
    /// The largest level a leaf may sit at (`KVM_MAX_HUGEPAGE_LEVEL`).
    pub const MAX_HUGEPAGE: Level = Level(3);

    /// Builds a level from 1..=4; `None` otherwise.
    pub const fn new(l: u8) -> Option<Level> {
        if l >= 1 && l <= 4 {
            Some(Level(l))
        } else {
            None
        }
    }
    /// The raw level number.
    pub const fn get(self) -> u8 {
        self.0
    }
    /// Number of 4 KiB pages one entry at this level maps (`KVM_PAGES_PER_HPAGE`).
    pub const fn pages(self) -> u64 {
        1u64 << (LEVEL_BITS * (self.0 as u32 - 1))
    }
    /// The level below, or `None` at 4K.
    pub const fn down(self) -> Option<Level> {
        if self.0 > 1 {
            Some(Level(self.0 - 1))
        } else {
            None
        }
    }
    /// The level above, or `None` at the root.
    pub const fn up(self) -> Option<Level> {
        if self.0 < 4 {
            Some(Level(self.0 + 1))
        } else {
            None
        }
    }
}

/// A memslot id (`kvm_memory_slot::id`), below [`SlotId::MAX`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct SlotId(u16);

impl SlotId {
    /// Number of user memslots per address space (KVM's `KVM_USER_MEM_SLOTS` on x86 is 32764; we
    /// keep the same order of magnitude).
    pub const MAX: u16 = 32764;
    /// Wraps a raw slot number; range checks happen in `set_user_memory_region`, which reports an
    /// out-of-range id as a typed error.
    pub const fn new(id: u16) -> SlotId {
        SlotId(id)
    }
    /// The raw slot number.
    pub const fn get(self) -> u16 {
        self.0
    }
}

/// An address space id (`as_id`): 0 is normal memory, 1 is SMM.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct AsId(u8);

impl AsId {
    /// Upper bound on address spaces (x86 has at most 2).
    pub const MAX_ADDRESS_SPACES: usize = 2;
    /// Wraps a raw address-space id.
    pub const fn new(id: u8) -> AsId {
        AsId(id)
    }
    /// The raw id.
    pub const fn get(self) -> u8 {
        self.0
    }
    /// The id as an index.
    pub const fn index(self) -> usize {
        self.0 as usize
    }
}

/// A half-open range of guest frames `[start, end)`, with `start <= end` checked on construction.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct GfnRange {
    start: Gfn,
    end: Gfn,
}

impl GfnRange {
    /// Builds `[start, end)`, or `None` if `end < start`.
    pub const fn new(start: Gfn, end: Gfn) -> Option<GfnRange> {
        if end.0 < start.0 {
            None
        } else {
            Some(GfnRange { start, end })
        }
    }
    /// Builds `[start, start + npages)`, or `None` on overflow.
    pub const fn from_len(start: Gfn, npages: u64) -> Option<GfnRange> {
        match start.0.checked_add(npages) {
            Some(e) => Some(GfnRange { start, end: Gfn(e) }),
            None => None,
        }
    }
    /// First gfn in the range.
    pub const fn start(&self) -> Gfn {
        self.start
    }
    /// One past the last gfn.
    pub const fn end(&self) -> Gfn {
        self.end
    }
    /// Number of gfns.
    pub const fn len(&self) -> u64 {
        self.end.0 - self.start.0
    }
    /// True if the range holds no gfn.
    pub const fn is_empty(&self) -> bool {
        self.end.0 == self.start.0
    }
    /// True if `gfn` lies in the range.
    pub const fn contains(&self, gfn: Gfn) -> bool {
        gfn.0 >= self.start.0 && gfn.0 < self.end.0
    }
    /// True if the two ranges share at least one gfn.
    pub const fn overlaps(&self, other: &GfnRange) -> bool {
        self.start.0 < other.end.0 && other.start.0 < self.end.0
    }
    /// The intersection, or `None` if the ranges are disjoint.
    pub fn intersect(&self, other: &GfnRange) -> Option<GfnRange> {
        let s = self.start.max(other.start);
        let e = self.end.min(other.end);
        if s < e {
            Some(GfnRange { start: s, end: e })
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpa_gfn_round_trip() {
        let gpa = Gpa::new(0x1234_5678);
        assert_eq!(gpa.gfn(), Gfn::new(0x12345));
        assert_eq!(gpa.page_offset(), 0x678);
        assert_eq!(Gfn::new(0x12345).gpa(), Some(Gpa::new(0x1234_5000)));
        assert_eq!(Gfn::new(u64::MAX).gpa(), None);
    }

    #[test]
    fn level_geometry() {
        assert_eq!(Level::L4K.pages(), 1);
        assert_eq!(Level::L2M.pages(), 512);
        assert_eq!(Level::L1G.pages(), 262_144);
        assert_eq!(Level::new(0), None);
        assert_eq!(Level::new(5), None);
        assert_eq!(Level::L4K.down(), None);
        assert_eq!(Level::ROOT.up(), None);
        let gfn = Gfn::new((3 << 27) | (5 << 18) | (7 << 9) | 11);
        assert_eq!(gfn.index_at(Level::L4K), 11);
        assert_eq!(gfn.index_at(Level::L2M), 7);
        assert_eq!(gfn.index_at(Level::L1G), 5);
        assert_eq!(gfn.index_at(Level::ROOT), 3);
        assert_eq!(Gfn::new(513).align_down(Level::L2M), Gfn::new(512));
    }

    #[test]
    fn checked_arithmetic_rejects_overflow() {
        assert_eq!(Hva::new(u64::MAX).checked_add(1), None);
        assert_eq!(Gfn::new(0).checked_sub(1), None);
        assert_eq!(GfnRange::from_len(Gfn::new(u64::MAX), 2), None);
        assert_eq!(GfnRange::new(Gfn::new(5), Gfn::new(4)), None);
    }

    #[test]
    fn ranges_overlap_and_intersect() {
        let a = GfnRange::new(Gfn::new(0), Gfn::new(10)).unwrap();
        let b = GfnRange::new(Gfn::new(10), Gfn::new(20)).unwrap();
        let c = GfnRange::new(Gfn::new(5), Gfn::new(15)).unwrap();
        assert!(!a.overlaps(&b));
        assert!(a.overlaps(&c));
        assert_eq!(a.intersect(&c), GfnRange::new(Gfn::new(5), Gfn::new(10)));
        assert_eq!(a.intersect(&b), None);
        assert!(c.contains(Gfn::new(14)) && !c.contains(Gfn::new(15)));
    }
}

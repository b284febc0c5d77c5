//! [`PteListDesc`]: a descriptor of the rmap chain (`struct pte_list_desc`).
//!
//! The fields are atomics accessed with `Relaxed` ordering. That costs nothing on x86 (plain moves)
//! and lets loom see every access: the ordering that makes a descriptor's contents visible comes from
//! the rmap bit (Acquire lock, Release unlock) and from `mmu_lock`, exactly as in the kernel, and a
//! missing edge would show up in loom as a stale count or entry caught by the shape checks.

use core::ptr::NonNull;

use super::{RmapStats, SptePtr};
use crate::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Entries per descriptor (`PTE_LIST_EXT`): with the 16-byte header a descriptor fills two cache lines.
pub const PTE_LIST_EXT: usize = 14;

/// Written into `spte_count` just before a descriptor is freed, so that a walker that reached a freed
/// descriptor (a broken protocol) fails the shape check instead of reading garbage silently.
const POISON_COUNT: u32 = 0xdead_0000;

/// A block of SPTE pointers in an rmap chain (`struct pte_list_desc`).
///
/// Metadata first, so a chain of a few entries touches one cache line. Shape (spec §4 item 27): the
/// head descriptor holds 1..=14 entries, every later ("tail") descriptor is full, and
/// `tail_count` is the number of entries in all descriptors after this one.
#[repr(C, align(64))]
pub struct PteListDesc {
    /// Exposed address of the next (older) descriptor, 0 if none.
    more: AtomicUsize,
    /// Entries used in this descriptor.
    spte_count: AtomicU32,
    /// Entries in all descriptors after this one.
    tail_count: AtomicU32,
    /// `SptePtr` words; `[spte_count..]` are 0.
    sptes: [AtomicUsize; PTE_LIST_EXT],
}

#[cfg(not(loom))]
const _: () = assert!(core::mem::size_of::<PteListDesc>() == 128);

/// A descriptor pointer as stored in the head word (`val & ~3` when MANY is set).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct DescPtr(NonNull<PteListDesc>);

impl DescPtr {
    /// Allocates an empty descriptor whose `more` is `more` and whose `tail_count` is `tail_count`.
    pub(super) fn alloc(stats: &RmapStats, more: Option<DescPtr>, tail_count: usize) -> DescPtr {
        let tail = u32::try_from(tail_count).expect(
            "rmap invariant 7 (spec §4 item 27) broken: more than u32::MAX entries in one rmap",
        );
        let desc = Box::new(PteListDesc {
            more: AtomicUsize::new(more.map_or(0, DescPtr::to_word)),
            spte_count: AtomicU32::new(0),
            tail_count: AtomicU32::new(tail),
            sptes: core::array::from_fn(|_| AtomicUsize::new(0)),
        });
        stats.note_alloc();
        // SAFETY: `Box::into_raw` never returns null.
        DescPtr(unsafe { NonNull::new_unchecked(Box::into_raw(desc)) })
    }

    /// Frees a descriptor that no chain reaches any more.
    ///
    /// # Safety
    /// The caller holds `mmu_lock` for write and either the rmap bit or knowledge that the chain is
    /// unpublished (module invariants 3 and 4), has already unlinked `self` from the chain it was in, and
    /// does not use `self` afterwards.
    pub(super) unsafe fn free(self, stats: &RmapStats) {
        // SAFETY: per the contract the descriptor is live and unreachable by anyone but us.
        let d = unsafe { self.0.as_ref() };
        // ORDERING: Relaxed: the poison is a debugging aid read by a walker only if the protocol is
        // broken; the correct protocol never lets a walker reach a freed descriptor (invariant 3).
        d.spte_count.store(POISON_COUNT, Ordering::Relaxed);
        d.more.store(0, Ordering::Relaxed);
        stats.note_free();
        #[cfg(not(loom))]
        // SAFETY: `self` came from `Box::into_raw` in `alloc` and is freed exactly once (contract).
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
        // Under loom the poisoned descriptor is leaked instead, so that a model in which a walker
        // reaches it (a protocol bug) reads the poison deterministically rather than freed memory.
    }

    /// The word stored in an rmap head or a `more` field for this descriptor.
    #[inline]
    pub(super) fn to_word(self) -> usize {
        self.0.as_ptr().expose_provenance()
    }

    /// Rebuilds a descriptor pointer from a nonzero word made by [`DescPtr::to_word`].
    ///
    /// # Safety
    /// `word` must come from `to_word` of a descriptor (tag bits already masked off).
    #[inline]
    pub(super) unsafe fn from_word(word: usize) -> DescPtr {
        let p = core::ptr::with_exposed_provenance_mut::<PteListDesc>(word);
        // SAFETY: per the contract `word` is the exposed, nonzero address of a descriptor.
        DescPtr(unsafe { NonNull::new_unchecked(p) })
    }

    /// Borrows the descriptor.
    ///
    /// # Safety
    /// The caller holds the rmap bit of the chain containing it, or `mmu_lock` for write (module
    /// invariant 3): only a writer that holds both frees descriptors.
    #[inline]
    pub(super) unsafe fn get<'a>(self) -> &'a PteListDesc {
        // SAFETY: per the contract the descriptor is not freed while the borrow is used.
        unsafe { self.0.as_ref() }
    }
}

impl PteListDesc {
    /// Entries in this descriptor.
    ///
    /// # Panics
    /// If the count is out of range: the descriptor was freed (poisoned) or corrupted, a bug in the
    /// rmap protocol (module invariant 3).
    #[inline]
    pub(super) fn count(&self) -> usize {
        // ORDERING (every Relaxed access of this impl): the rmap bit or `mmu_lock` orders descriptor
        // contents between holders (module invariant 2); the fields publish nothing themselves.
        let n = self.spte_count.load(Ordering::Relaxed);
        assert!(
            n as usize <= PTE_LIST_EXT,
            "rmap invariant 3 broken: walked a freed or corrupt pte_list_desc (spte_count {n:#x})"
        );
        n as usize
    }

    /// Entries in all descriptors after this one.
    #[inline]
    pub(super) fn tail_count(&self) -> usize {
        self.tail_count.load(Ordering::Relaxed) as usize
    }

    /// The next (older) descriptor.
    #[inline]
    pub(super) fn more(&self) -> Option<DescPtr> {
        match self.more.load(Ordering::Relaxed) {
            0 => None,
            // SAFETY: nonzero `more` words are only written from `DescPtr::to_word`.
            w => Some(unsafe { DescPtr::from_word(w) }),
        }
    }

    /// Entry `i` (`i < count()`).
    #[inline]
    pub(super) fn get(&self, i: usize) -> SptePtr {
        let w = self.sptes[i].load(Ordering::Relaxed);
        assert!(
            w != 0,
            "rmap invariant 7 (spec §4 item 27) broken: empty slot {i} below spte_count"
        );
        // SAFETY: nonzero entries below `spte_count` are words of `SptePtr`s in the chain.
        unsafe { SptePtr::from_word(w) }
    }

    /// Overwrites entry `i` (writers only).
    #[inline]
    pub(super) fn set(&self, i: usize, spte: SptePtr) {
        self.sptes[i].store(spte.to_word(), Ordering::Relaxed);
    }

    /// Appends `spte`; the descriptor must not be full (writers only).
    #[inline]
    pub(super) fn push(&self, spte: SptePtr) {
        let n = self.count();
        assert!(
            n < PTE_LIST_EXT,
            "rmap invariant 7 (spec §4 item 27) broken: push into a full pte_list_desc"
        );
        self.set(n, spte);
        self.spte_count.store(n as u32 + 1, Ordering::Relaxed);
    }

    /// Removes and returns the last entry; the descriptor must not be empty (writers only).
    #[inline]
    pub(super) fn pop(&self) -> SptePtr {
        let n = self.count();
        assert!(
            n > 0,
            "rmap invariant 7 (spec §4 item 27) broken: pop from an empty pte_list_desc"
        );
        let last = self.get(n - 1);
        self.sptes[n - 1].store(0, Ordering::Relaxed);
        self.spte_count.store(n as u32 - 1, Ordering::Relaxed);
        last
    }
}

//! [`SptePtr`]: the only type in the rmap code that touches SPTE memory.
//!
//! An rmap stores the addresses of SPTE slots (`u64 *sptep` in the kernel). This module fences the
//! raw pointer in: the one `unsafe` promise is made when a pointer is created ([`SptePtr::new`]); every
//! access afterwards is a safe, single atomic operation on the slot. The SPTE bits used here (A = bit 8,
//! shadow-present = bit 11) mirror `mmu/spte.rs`; the lead wires [`SptePtr`] to `AtomicSpte`, which is a
//! `#[repr(transparent)]` wrapper of the same `AtomicU64`.

use core::fmt;
use core::ptr::NonNull;

use crate::sync::atomic::{AtomicU64, Ordering};

/// The Accessed bit of an SPTE (bit 8, as `spte::ACCESSED_MASK`).
pub const SPTE_ACCESSED_MASK: u64 = 1 << 8;
/// The shadow-present bit of an SPTE (bit 11, as `spte::MMU_PRESENT_MASK`).
pub const SPTE_PRESENT_MASK: u64 = 1 << 11;

// The rmap head keeps two tag bits (MANY, LOCKED) in the low bits of an SPTE address, and an
// SPTE word keeps a third, `DIRECT_LEAF`.
const _: () = assert!(core::mem::align_of::<AtomicU64>() >= 8);

/// Bit 2 of an SPTE word: the slot is a leaf slot of a direct shadow page's table
/// ([`SptePtr::from_direct_leaf`]).
const DIRECT_LEAF: usize = 1 << 2;

/// True if `spte` is shadow-present with its Accessed bit set (`is_shadow_present_pte && is_accessed_spte`).
#[inline]
pub fn spte_is_young(spte: u64) -> bool {
    spte & (SPTE_PRESENT_MASK | SPTE_ACCESSED_MASK) == (SPTE_PRESENT_MASK | SPTE_ACCESSED_MASK)
}

/// A pointer to one SPTE slot, as stored in an rmap.
///
/// Copyable and comparable by address and kind. All accesses are atomic, so any number of threads
/// may use copies of the same pointer at once (hardware setting A/D, `mmu_lock` writers, lockless
/// agers). A pointer made by [`SptePtr::from_direct_leaf`] also records that its slot is a leaf slot
/// of a direct shadow page, which lets aging find the page and read its table in order; a slot is
/// always named the same way (both when added to an rmap and when removed).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SptePtr {
    ptr: NonNull<AtomicU64>,
    direct_leaf: bool,
}

// SAFETY: an `SptePtr` is an address of an `AtomicU64` that, by the contract of `SptePtr::new`, stays
// allocated while the pointer is used; the pointee is only accessed through atomic operations, which
// are safe to perform from any thread.
unsafe impl Send for SptePtr {}
// SAFETY: as for `Send`: shared copies only perform atomic operations on the slot.
unsafe impl Sync for SptePtr {}

impl fmt::Debug for SptePtr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SptePtr({:#x})", self.addr())
    }
}

impl SptePtr {
    /// Makes an rmap entry for the SPTE slot `slot`.
    ///
    /// # Safety
    /// `slot` must stay allocated for as long as the returned pointer (or a copy of it) is used:
    /// at least until it has been removed from every rmap it was added to, and until no lockless
    /// walker can still hold an rmap bit that listed it. In kvmmu that is the shadow-page lifetime
    /// rule of spec §3.9 ("Why SPTE memory stays valid", §4 item 33): a shadow page is freed only after
    /// each of its SPTEs left its rmaps (which takes each rmap's bit) and a remote TLB flush.
    #[inline]
    pub unsafe fn new(slot: &AtomicU64) -> SptePtr {
        SptePtr {
            ptr: NonNull::from(slot),
            direct_leaf: false,
        }
    }

    /// Makes an rmap entry for an [`AtomicSpte`](crate::mmu::spte::AtomicSpte) slot of a shadow page.
    ///
    /// # Safety
    /// As [`SptePtr::new`]: the slot must stay allocated while the pointer is used.
    #[cfg(not(loom))]
    #[inline]
    pub unsafe fn from_spte(slot: &crate::mmu::spte::AtomicSpte) -> SptePtr {
        // `AtomicSpte` is `#[repr(transparent)]` over `AtomicU64`, so the cast keeps layout.
        let p = core::ptr::from_ref(slot).cast::<AtomicU64>();
        SptePtr {
            // SAFETY: `p` comes from a reference, so it is non-null and aligned; the caller keeps
            // the slot allocated (this function's contract).
            ptr: unsafe { NonNull::new_unchecked(p.cast_mut()) },
            direct_leaf: false,
        }
    }

    /// Makes an rmap entry for a leaf slot of a *direct* shadow page's table (`role.direct`): the
    /// page holding it is found from its address (`sptep_to_sp`), and its entry `i` maps only the
    /// page's gfn plus `i` times its level's size (docs/invariants.md "Shadow aging in table
    /// order").
    ///
    /// # Safety
    /// As [`SptePtr::from_spte`], and `slot` is an entry of the table of a direct shadow page
    /// whose leaves are listed in the rmaps of their gfns.
    #[cfg(not(loom))]
    #[inline]
    pub unsafe fn from_direct_leaf(slot: &crate::mmu::spte::AtomicSpte) -> SptePtr {
        SptePtr {
            // SAFETY: the caller's contract includes `from_spte`'s.
            ptr: unsafe { SptePtr::from_spte(slot) }.ptr,
            direct_leaf: true,
        }
    }

    /// True if this pointer was made by [`SptePtr::from_direct_leaf`].
    #[inline]
    pub fn is_direct_leaf(self) -> bool {
        self.direct_leaf
    }

    /// Zaps the SPTE (`mmu_spte_clear_track_bits`): swaps in `nonpresent` and returns the old value,
    /// so a Dirty bit set concurrently by hardware is seen by the caller, never lost.
    #[inline]
    pub fn zap(self, nonpresent: u64) -> u64 {
        // ORDERING: Relaxed: atomicity keeps a concurrent A/D update from being lost (spec §4 item
        // 19); the TLB flush that follows a zap, not this store, orders vCPUs after it.
        self.slot().swap(nonpresent, Ordering::Relaxed)
    }

    /// The slot's address (for ordering, hashing and diagnostics; a single-entry rmap head holds it).
    #[inline]
    pub fn addr(self) -> usize {
        self.ptr.as_ptr().addr()
    }

    /// The value stored in an rmap head or descriptor for this pointer: its exposed address, with
    /// bit 2 set for a direct leaf.
    #[inline]
    pub(super) fn to_word(self) -> usize {
        self.ptr.as_ptr().expose_provenance() | if self.direct_leaf { DIRECT_LEAF } else { 0 }
    }

    /// Rebuilds a pointer from a word produced by [`SptePtr::to_word`].
    ///
    /// # Safety
    /// `word` must have been returned by `to_word` of a pointer that is still in an rmap.
    #[inline]
    pub(super) unsafe fn from_word(word: usize) -> SptePtr {
        let p = core::ptr::with_exposed_provenance_mut::<AtomicU64>(word & !DIRECT_LEAF);
        SptePtr {
            // SAFETY: per the contract, `word` less its tag is the exposed address of a live
            // `AtomicU64`, never 0.
            ptr: unsafe { NonNull::new_unchecked(p) },
            direct_leaf: word & DIRECT_LEAF != 0,
        }
    }

    #[inline]
    fn slot(&self) -> &AtomicU64 {
        // SAFETY: `SptePtr::new`'s contract keeps the slot allocated while this pointer is used
        // (rmap invariant 5); the slot is only accessed atomically, so a shared reference
        // is sound even while hardware and other threads update it.
        unsafe { self.ptr.as_ref() }
    }

    /// Reads the SPTE once (`mmu_spte_get_lockless`).
    #[inline]
    pub fn load_lockless(self) -> u64 {
        // ORDERING: Relaxed: spec §3.9 "memory-ordering discussion": the reader must accept a present
        // or a non-present value, and nothing is published through the SPTE to a shadow ager.
        self.slot().load(Ordering::Relaxed)
    }

    /// Clears the Accessed bit with one atomic AND and returns the previous value
    /// (`kvm_tdp_mmu_age_spte` / `clear_bit(A)`); a concurrent Dirty or Writable update cannot be lost
    /// (spec §4 item 19).
    #[inline]
    pub fn clear_accessed(self) -> u64 {
        // ORDERING: Relaxed: the AND is atomic, which is all item 19 needs; aging publishes nothing.
        self.slot()
            .fetch_and(!SPTE_ACCESSED_MASK, Ordering::Relaxed)
    }

    /// Ages a young SPTE last read as `old`: [`SptePtr::clear_accessed`] for an A/D-enabled one;
    /// for an A/D-disabled one (`spte::AD_DISABLED_MASK`) one compare-and-swap that marks it for
    /// access tracking, not retried (`spte::age_ad_disabled`). Returns true if this call aged it.
    #[inline]
    pub fn age(self, old: u64) -> bool {
        let old = crate::mmu::spte::Spte::from_raw(old);
        if old.ad_enabled() {
            self.clear_accessed() & SPTE_ACCESSED_MASK != 0
        } else {
            let slot: &crate::mmu::spte::AtomicSpte = self.as_atomic_spte();
            crate::mmu::spte::age_ad_disabled(slot, old).raw() & SPTE_ACCESSED_MASK != 0
        }
    }

    /// The slot as the SPTE module's atomic type.
    #[inline]
    fn as_atomic_spte(&self) -> &crate::mmu::spte::AtomicSpte {
        let slot: *const AtomicU64 = self.slot();
        // SAFETY: `AtomicSpte` is a `#[repr(transparent)]` wrapper of `AtomicU64`, so the cast
        // keeps layout and validity; the slot stays allocated while this pointer is used
        // (`SptePtr::new`'s contract, rmap invariant 5).
        unsafe { &*slot.cast::<crate::mmu::spte::AtomicSpte>() }
    }

    /// Clears `mask` with one atomic AND and returns the previous value (dirty logging's re-arm
    /// clears W this way, keeping MMU-writable; docs/locking.md "Dirty logging" D1).
    #[inline]
    pub fn clear_bits(self, mask: u64) -> u64 {
        // ORDERING: Relaxed: atomicity keeps a concurrent A/D update (item 19); the remote TLB
        // flush the caller issues afterwards orders vCPUs after it.
        self.slot().fetch_and(!mask, Ordering::Relaxed)
    }
}

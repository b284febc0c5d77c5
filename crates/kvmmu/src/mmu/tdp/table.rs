//! Page-table pages and the one type that holds raw pointers to them ([`TablePtr`]).
//!
//! A page-table page is a 4 KiB-aligned heap object of [`ENTRIES`] [`AtomicSpte`]s. A non-leaf SPTE
//! stores the child's address >> 12 in its pfn field, so following a table pointer is
//! "load the SPTE with Acquire (spte.rs O1), turn the pfn back into a pointer". Every raw pointer
//! of the TDP MMU lives in a [`TablePtr`]; its `unsafe` methods state the protocol rule
//! (tdp/mod.rs P1–P7) the caller must cite.
//!
//! Geometry ([`crate::geometry`]): 512 entries × 4 levels normally; under `cfg(loom)` 4 entries ×
//! 2 levels, so the model checker explores a tree of a handful of slots.

use core::ptr::NonNull;

use crate::addr::Level;
use crate::geometry::index;
pub(crate) use crate::geometry::{ENTRIES, GFN_LIMIT, ROOT_LEVEL};
#[cfg(test)]
use crate::geometry::{align_down, pages};
use crate::mmu::spte::{AtomicSpte, BASE_ADDR_MASK, Spte, make_nonleaf_spte};
use crate::sync::atomic::AtomicU64;
#[cfg(any(loom, test, feature = "broken-free-before-flush-ack"))]
use crate::sync::atomic::Ordering;

/// A page-table page.
#[repr(C, align(4096))]
pub(crate) struct Table {
    entries: [AtomicSpte; ENTRIES],
}

impl Table {
    /// The entry for `gfn` at this table's `level`.
    #[inline]
    pub(crate) fn entry(&self, gfn: u64, level: Level) -> &AtomicSpte {
        &self.entries[index(gfn, level)]
    }
    /// All entries, in index order (for tight scans of one table).
    #[inline]
    pub(crate) fn entries(&self) -> &[AtomicSpte; ENTRIES] {
        &self.entries
    }
    /// The entry at position `i`.
    #[inline]
    pub(crate) fn at(&self, i: usize) -> &AtomicSpte {
        &self.entries[i]
    }
}

/// A table's allocation: the table, then the owner words of its entries beside it (as
/// `struct kvm_mmu_page` keeps metadata beside `spt`). [`TablePtr`] points at its first field, so
/// a `Table` stays exactly one page and the walk's pointer arithmetic is unchanged.
#[repr(C, align(4096))]
struct TablePage {
    table: Table,
    owners: Owners,
}

/// The owner word of each entry of one table: what the fault that installed the entry's leaf
/// expected the leaf's frames to back (docs/locking.md, "The guest-mode TLB miss", G3).
///
/// Encoding: `mmu/owner.rs`, shared with the shadow MMU; 0 means unknown (a leaf installed by a
/// path that records no owner: direct `TdpMmu::map` callers, and split children or recovered
/// huge leaves made from leaves without a recorded owner; splits and recovery carry known owners
/// over, G4 in docs/locking.md). A reader that finds an unknown word, or one whose pfn bits do not
/// match the leaf it walked, falls back to the memslot check, so a stale or missing word can
/// cost time but never decides a stale-translation report.
#[repr(C)]
pub(crate) struct Owners([AtomicU64; ENTRIES]);

impl Owners {
    /// The owner word of entry `i`.
    #[inline]
    pub(crate) fn at(&self, i: usize) -> &AtomicU64 {
        &self.0[i]
    }
}

/// Under loom a "freed" table is poisoned and leaked instead of deallocated, so that a read of a
/// freed table is a detected assertion failure (spte.rs checks every access) rather than undefined
/// behaviour the model cannot see.
///
/// The deliberately broken build `broken-free-before-flush-ack` (test-only) frees the same way, so
/// that a vCPU walking a table freed before it acknowledged the flush is a detected failure.
#[cfg(any(loom, feature = "broken-free-before-flush-ack"))]
pub(crate) const POISON: Spte = Spte::from_raw(0xdead_0000_0000_0bad);

/// A pointer to a page-table page: the only holder of raw table pointers.
///
/// Ownership is protocol-level, not type-level: a `TablePtr` is either *owned* (freshly
/// allocated and not yet published, or unlinked and handed to [`TablePtr::free`] through RCU) or
/// a *borrowed view* of a reachable table valid for the RCU read section it was loaded in.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct TablePtr(NonNull<Table>);

// SAFETY: a `TablePtr` is an address of a `Table`, whose contents are atomics (`Sync`); moving the
// address to another thread moves only the right to use it under the protocol (P1: the RCU
// callback that frees a table runs on whichever thread flushes the epoch).
unsafe impl Send for TablePtr {}
// SAFETY: as above; shared access to a `Table` is through atomics only.
unsafe impl Sync for TablePtr {}

impl TablePtr {
    /// Allocates a table with every entry [`Spte::NONPRESENT`].
    pub(crate) fn alloc() -> TablePtr {
        let page = Box::new(TablePage {
            table: Table {
                entries: core::array::from_fn(|_| AtomicSpte::new(Spte::NONPRESENT)),
            },
            owners: Owners(core::array::from_fn(|_| AtomicU64::new(0))),
        });
        // `TablePage` is `repr(C)` with the table first: the cast keeps the whole allocation's
        // provenance and points at the table.
        TablePtr(NonNull::from(Box::leak(page)).cast::<Table>())
    }

    /// The non-leaf SPTE that links this table (`make_nonleaf_spte`).
    pub(crate) fn to_spte(self) -> Spte {
        make_nonleaf_spte(self.0.as_ptr().expose_provenance() as u64)
    }

    /// The table a non-leaf SPTE points to.
    ///
    /// The pointer is only meaningful if `spte` is a present non-leaf read from a table that is
    /// itself valid (P1); dereferencing it is what needs the proof, not building it.
    pub(crate) fn from_spte(spte: Spte) -> TablePtr {
        let addr = (spte.raw() & BASE_ADDR_MASK) as usize;
        let ptr = core::ptr::with_exposed_provenance_mut::<Table>(addr);
        TablePtr(
            NonNull::new(ptr).expect("a present non-leaf SPTE holds a non-null table address (P2)"),
        )
    }

    /// Borrows the table for `'a`.
    ///
    /// # Safety
    /// The table must stay allocated for `'a`: either the caller owns it (P1: allocated and not
    /// yet freed), or it was reached from a root or a present non-leaf SPTE while an RCU guard that
    /// outlives `'a` was pinned (P1: unlinked tables are freed only after that guard is dropped),
    /// or it is a root table of a root the caller holds a reference to or reached under RCU (P4),
    /// or it was reached from such a root through present non-leaf SPTEs while the caller holds
    /// this MMU's `mmu_lock` (either mode) for all of `'a` (P2: links are removed only under
    /// `mmu_lock` write; docs/locking.md F1).
    #[inline]
    pub(crate) unsafe fn get<'a>(self) -> &'a Table {
        // SAFETY: the caller upholds this function's contract (the table is allocated for 'a);
        // `Table` is only ever accessed through shared references to atomics.
        unsafe { self.0.as_ref() }
    }

    /// Borrows the owner words beside the table for `'a`.
    ///
    /// # Safety
    /// As [`TablePtr::get`].
    #[inline]
    pub(crate) unsafe fn owners<'a>(self) -> &'a Owners {
        // SAFETY: `self` points at the first field of a live `TablePage` (every `TablePtr` comes
        // from `alloc`, and the caller upholds `get`'s contract); `owners` is its second field.
        unsafe { &(*self.0.cast::<TablePage>().as_ptr()).owners }
    }

    /// Frees the table.
    ///
    /// # Safety
    /// The table must be unreachable from every root and every SPTE, and no thread may still hold
    /// a reference to it: either it was never published (a lost link CAS), or this runs as an RCU
    /// callback deferred after it was unlinked (P1). It must not be freed twice (P1).
    pub(crate) unsafe fn free(self) {
        #[cfg(loom)]
        {
            // SAFETY: the caller guarantees the table is still allocated (we never deallocate
            // under loom); no reader may legitimately read it any more, and the POISON stores
            // make an illegitimate read fail its assertion in spte.rs.
            let table = unsafe { self.get() };
            for e in &table.entries {
                // ORDERING: the poison only needs to be seen by a (buggy) reader that is ordered
                // after the free through the RCU grace period, which already synchronises.
                e.store_poison(POISON, Ordering::Relaxed);
            }
        }
        #[cfg(all(not(loom), feature = "broken-free-before-flush-ack"))]
        {
            // SAFETY: as the loom arm: never deallocated in this test-only build.
            let table = unsafe { self.get() };
            for e in &table.entries {
                // ORDERING: Relaxed: this build exists to be caught reading the poison; a walker
                // that reads the table concurrently sees the poison or the old value, both fine.
                e.store(POISON, Ordering::Relaxed);
            }
        }
        #[cfg(all(not(loom), not(feature = "broken-free-before-flush-ack")))]
        {
            // SAFETY: the table is the first field of a `TablePage` that came from `Box::leak` in
            // `alloc`, and the caller guarantees it is unreachable and freed only once.
            drop(unsafe { Box::from_raw(self.0.cast::<TablePage>().as_ptr()) });
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn table_is_one_aligned_page_and_pointer_round_trips() {
        assert_eq!(core::mem::size_of::<Table>(), 4096);
        assert_eq!(core::mem::align_of::<Table>(), 4096);
        let t = TablePtr::alloc();
        let spte = t.to_spte();
        assert_eq!(spte.kind(Level::L2M), crate::mmu::spte::SpteKind::Table);
        assert_eq!(TablePtr::from_spte(spte), t);
        // SAFETY: `t` was just allocated and is owned by this test.
        let table = unsafe { t.get() };
        assert!((0..ENTRIES).all(|i| table.at(i).load(Ordering::Relaxed) == Spte::NONPRESENT));
        // SAFETY: never published; freed once.
        unsafe { t.free() };
    }

    #[test]
    fn owner_words_start_unknown_and_sit_beside_a_one_page_table() {
        let t = TablePtr::alloc();
        // SAFETY: `t` was just allocated and is owned by this test.
        let owners = unsafe { t.owners() };
        assert!((0..ENTRIES).all(|i| owners.at(i).load(Ordering::Relaxed) == 0));
        assert_eq!(core::mem::size_of::<TablePage>(), 2 * 4096);
        // SAFETY: never published; freed once.
        unsafe { t.free() };
    }

    #[test]
    fn geometry_matches_addr_helpers() {
        let gfn = (3u64 << 27) | (5 << 18) | (7 << 9) | 11;
        for l in 1..=4 {
            let level = Level::new(l).unwrap();
            assert_eq!(
                index(gfn, level),
                crate::addr::Gfn::new(gfn).index_at(level)
            );
            assert_eq!(pages(level), level.pages());
        }
        assert_eq!(GFN_LIMIT, 1 << 36);
        assert_eq!(align_down(513, Level::L2M), 512);
    }
}

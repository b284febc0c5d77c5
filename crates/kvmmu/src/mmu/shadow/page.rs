//! Shadow pages (`struct kvm_mmu_page` of the shadow MMU) and the one type that holds raw pointers
//! to them ([`SpPtr`]). See the parent module for the lifetime protocol (S1–S7).

use core::ptr::NonNull;

use crate::addr::{AsId, Gfn, Level};
use crate::geometry::{ENTRIES, index};
use crate::mmu::spte::{AtomicSpte, BASE_ADDR_MASK, Spte, make_nonleaf_spte};
use crate::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::rmap::{RmapHead, SptePtr};

/// `union kvm_mmu_page_role`, the parts this MMU uses. Direct pages map guest physical memory;
/// indirect pages (`direct == false`, `nested/`) shadow one EPT12 table of an L1 guest, whose L1
/// gfn is the page's `gfn`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct Role {
    /// The level of the SPTEs in the page.
    pub(crate) level: Level,
    /// The address space (`role.smm`).
    pub(crate) as_id: AsId,
    /// The page maps guest physical memory directly (no guest page table is shadowed).
    pub(crate) direct: bool,
}

/// A shadow page: 512 SPTEs, then its metadata. `spt` is at offset 0 and the struct is 4 KiB
/// aligned, so the address in a non-leaf SPTE is the address of the page (`sptep_to_sp`).
#[repr(C, align(4096))]
pub(crate) struct ShadowPage {
    spt: [AtomicSpte; ENTRIES],
    /// The first gfn the page maps (`sp->gfn`).
    pub(crate) gfn: u64,
    /// The page's role (hash key with `gfn`).
    pub(crate) role: Role,
    /// The parent SPTEs that point at this page (`parent_ptes`, rmap encoding). Changed only under
    /// `mmu_lock` write.
    pub(crate) parent_ptes: RmapHead,
    /// Roots only: references (`root_count`); the MMU holds one while the root is valid (S3).
    pub(crate) root_count: AtomicUsize,
    /// `role.invalid`: set once, under `mmu_lock` write, by prepare-zap.
    pub(crate) invalid: AtomicBool,
    /// Indirect 4K-level pages only (`shadowed_translation`): the L1 gfn each leaf maps, written
    /// under `mmu_lock` write before the leaf is published (`nested/`, N1).
    shadowed: Option<Box<[AtomicU64; ENTRIES]>>,
    /// Direct pages only: the owner word of each entry's leaf (`mmu/owner.rs`; G5 in
    /// docs/locking.md), written under `mmu_lock` write before the leaf is published and read by
    /// a vCPU's guest-mode walk after its `Acquire` load of the leaf.
    owners: Option<Box<[AtomicU64; ENTRIES]>>,
    /// Indirect pages only: L1 writes to the shadowed table since a fault last used the page
    /// (`write_flooding_count`); changed under `mmu_lock` write.
    pub(crate) write_flooding_count: AtomicU32,
}

impl ShadowPage {
    /// The SPTE for `gfn` in this page.
    #[inline]
    pub(crate) fn entry(&self, gfn: u64) -> &AtomicSpte {
        &self.spt[index(gfn, self.role.level)]
    }
    /// The SPTE at position `i`.
    #[inline]
    pub(crate) fn at(&self, i: usize) -> &AtomicSpte {
        &self.spt[i]
    }
    /// The whole table, in entry order.
    #[inline]
    pub(crate) fn table(&self) -> &[AtomicSpte; ENTRIES] {
        &self.spt
    }
    /// The first gfn mapped by entry `i`.
    #[inline]
    pub(crate) fn gfn_of(&self, i: usize) -> Gfn {
        Gfn::new(self.gfn + i as u64 * self.role.level.pages())
    }
    /// The gfn whose rmap lists leaf `i`: the gfn it maps for a direct page, the L1 gfn recorded
    /// when the leaf was installed for an indirect one (`kvm_mmu_page_get_gfn`).
    #[inline]
    pub(crate) fn leaf_gfn(&self, i: usize) -> Gfn {
        match &self.shadowed {
            // ORDERING: Relaxed: written before the leaf's Release store under `mmu_lock` write;
            // readers hold `mmu_lock` or Acquire-loaded the leaf first (nested N1).
            Some(s) => Gfn::new(s[i].load(Ordering::Relaxed)),
            None => self.gfn_of(i),
        }
    }
    /// Records the L1 gfn of leaf `i` of an indirect 4K-level page (before publishing the leaf).
    ///
    /// # Panics
    /// On a page that is not an indirect 4K-level page (a kvmmu bug).
    #[inline]
    pub(crate) fn set_leaf_gfn(&self, i: usize, gfn: Gfn) {
        let Some(s) = &self.shadowed else {
            panic!("kvmmu bug: set_leaf_gfn on a page without shadowed translations");
        };
        // ORDERING: see `leaf_gfn`.
        s[i].store(gfn.raw(), Ordering::Relaxed);
    }
    /// The owner word of entry `i` of a direct page (`None` on an indirect page, whose leaves
    /// record none: their fills check the L1 gfn's memslot).
    #[inline]
    pub(crate) fn owner_word(&self, i: usize) -> Option<&AtomicU64> {
        self.owners.as_deref().map(|o| &o[i])
    }
    /// True once prepare-zap ran on the page.
    #[inline]
    pub(crate) fn is_invalid(&self) -> bool {
        // ORDERING: Relaxed: written under `mmu_lock` write; readers under the lock are ordered by
        // it, and a vCPU's lockless read is a hint re-checked under the lock by the fault (S4).
        self.invalid.load(Ordering::Relaxed)
    }
}

/// A pointer to a [`ShadowPage`]: the only holder of raw shadow-page pointers.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct SpPtr(NonNull<ShadowPage>);

// SAFETY: a `ShadowPage` holds only atomics and plain data written before publication; the pointer's
// validity is governed by S1–S3, not by the thread holding it.
unsafe impl Send for SpPtr {}
// SAFETY: as above; shared access to a page is through atomics, or under `mmu_lock` write.
unsafe impl Sync for SpPtr {}

impl SpPtr {
    /// Allocates an empty page (every SPTE non-present).
    pub(crate) fn alloc(gfn: u64, role: Role, root_count: usize) -> SpPtr {
        let sp = Box::new(ShadowPage {
            spt: core::array::from_fn(|_| AtomicSpte::new(Spte::NONPRESENT)),
            gfn,
            role,
            parent_ptes: RmapHead::new(),
            root_count: AtomicUsize::new(root_count),
            invalid: AtomicBool::new(false),
            shadowed: (!role.direct && role.level == Level::L4K)
                .then(|| Box::new(core::array::from_fn(|_| AtomicU64::new(0)))),
            owners: role
                .direct
                .then(|| Box::new(core::array::from_fn(|_| AtomicU64::new(0)))),
            write_flooding_count: AtomicU32::new(0),
        });
        SpPtr(NonNull::from(Box::leak(sp)))
    }

    /// The non-leaf SPTE that links this page.
    pub(crate) fn to_spte(self) -> Spte {
        make_nonleaf_spte(self.0.as_ptr().expose_provenance() as u64)
    }

    /// The page a present non-leaf SPTE points to. Dereferencing it is what needs the proof.
    pub(crate) fn from_spte(spte: Spte) -> SpPtr {
        let addr = (spte.raw() & BASE_ADDR_MASK) as usize;
        let p = core::ptr::with_exposed_provenance_mut::<ShadowPage>(addr);
        SpPtr(NonNull::new(p).expect("a present non-leaf SPTE holds a non-null page address (S2)"))
    }

    /// The page's address (diagnostics).
    #[cfg(test)]
    pub(crate) fn addr(self) -> usize {
        self.0.as_ptr().addr()
    }

    /// Borrows the page.
    ///
    /// # Safety
    /// The page must stay allocated for `'a`: the caller holds `mmu_lock` (pages are freed only
    /// under `mmu_lock` write, S1), or a root reference to it (S3), or is a vCPU in guest mode that
    /// reached it from its referenced root and has not passed an instruction boundary since (S2),
    /// or holds the bit of an rmap whose locked chain lists an SPTE of the page (S1: that SPTE
    /// leaves its rmap, which takes the bit, before the page can be freed).
    #[inline]
    pub(crate) unsafe fn get<'a>(self) -> &'a ShadowPage {
        // SAFETY: this function's contract.
        unsafe { self.0.as_ref() }
    }

    /// An rmap entry for SPTE `i` of this page.
    ///
    /// # Safety
    /// The page must be live (as for [`SpPtr::get`]); the entry must be removed from its rmap before
    /// the page is freed (S1).
    #[inline]
    pub(crate) unsafe fn sptep(self, i: usize) -> SptePtr {
        // SAFETY: the caller guarantees the page is live.
        let slot = unsafe { self.get() }.at(i);
        // SAFETY: S1: the page is freed only after every SPTE left every rmap and a TLB flush.
        unsafe { SptePtr::from_spte(slot) }
    }

    /// The rmap entry for leaf SPTE `i` of this page: [`SptePtr::from_direct_leaf`] for a direct
    /// page, so aging may read the page's table in order, and [`SpPtr::sptep`] otherwise. Every
    /// leaf is added to and removed from its rmap under this name.
    ///
    /// # Safety
    /// As [`SpPtr::sptep`].
    #[inline]
    pub(crate) unsafe fn leaf_sptep(self, i: usize) -> SptePtr {
        // SAFETY: the caller guarantees the page is live.
        let page = unsafe { self.get() };
        if page.role.direct {
            // SAFETY: S1 as in `sptep`; `page` is direct and its leaves are listed in the rmaps
            // of their gfns (S6).
            unsafe { SptePtr::from_direct_leaf(page.at(i)) }
        } else {
            // SAFETY: as in `sptep`.
            unsafe { self.sptep(i) }
        }
    }

    /// The page holding the SPTE slot `sptep` and the slot's index in it (`sptep_to_sp`,
    /// `spte_index`): pages are 4 KiB aligned with their table at offset 0, and every leaf rmap
    /// entry points into a page's table (S6). Dereferencing the result is what needs the proof
    /// ([`SpPtr::get`]).
    #[inline]
    pub(crate) fn containing(sptep: SptePtr) -> (SpPtr, usize) {
        const PAGE: usize = core::mem::align_of::<ShadowPage>();
        let addr = sptep.addr();
        let p = core::ptr::with_exposed_provenance_mut::<ShadowPage>(addr & !(PAGE - 1));
        let sp = SpPtr(NonNull::new(p).expect("an SPTE slot lies in a shadow page's table (S6)"));
        (sp, (addr % PAGE) / core::mem::size_of::<AtomicSpte>())
    }

    /// Frees the page.
    ///
    /// # Safety
    /// The page must be unreachable (no parent SPTE, no rmap entry, off the hash and root tables),
    /// no thread may still use it (a remote TLB flush completed after it was unlinked, or it is a
    /// root whose last reference was just dropped), and it is freed once (S1, S3).
    pub(crate) unsafe fn free(self) {
        // SAFETY: the page came from `Box::leak` in `alloc`; this function's contract.
        drop(unsafe { Box::from_raw(self.0.as_ptr()) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_page_table_is_at_offset_zero_and_page_aligned() {
        assert_eq!(core::mem::align_of::<ShadowPage>(), 4096);
        let role = Role {
            level: Level::L2M,
            as_id: AsId::new(0),
            direct: true,
        };
        let sp = SpPtr::alloc(512, role, 0);
        assert_eq!(SpPtr::from_spte(sp.to_spte()), sp);
        // SAFETY: just allocated, owned by the test.
        let p = unsafe { sp.sptep(3) };
        assert_eq!(p.addr(), sp.addr() + 3 * 8);
        // SAFETY: as above.
        assert_eq!(unsafe { sp.get() }.gfn_of(2), Gfn::new(512 + 2 * 512));
        // SAFETY: never published; freed once.
        unsafe { sp.free() };
    }
}

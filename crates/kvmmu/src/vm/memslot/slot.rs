//! One memslot (`struct kvm_memory_slot`, spec §1.2) and the ioctl argument that creates it.
//!
//! A [`Memslot`] maps the guest frames `[base_gfn, base_gfn + npages)` onto the host range
//! `[userspace_addr, userspace_addr + npages * PAGE_SIZE)`, page for page. It is immutable
//! (module invariant 1): the constructor checks the bounds once, so the conversions below are plain
//! arithmetic that cannot overflow.

use bitflags::bitflags;

use crate::addr::{AsId, Gfn, GfnRange, Gpa, Hva, PAGE_SHIFT, PAGE_SIZE, SlotId};
use crate::mmu::shadow::SlotRmaps;
use crate::sync::Arc;
use crate::vm::dirty_log::DirtyBitmap;

/// A slot's optional rmap arrays. Equality is identity: two slots are equal when they share the
/// same arrays (or both have none), so the derived `PartialEq` of [`Memslot`] keeps comparing the
/// user-visible fields.
#[derive(Debug)]
struct RmapsRef(Option<Arc<SlotRmaps>>);

impl PartialEq for RmapsRef {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for RmapsRef {}

/// A slot's large-page counts. They are a function of the slot's gfns and host address (plus
/// tracking that its owners undo), so every two handles compare equal and [`Memslot`]'s derived
/// `PartialEq` keeps comparing the user-visible fields.
#[derive(Debug, Clone)]
struct LpageRef(Arc<super::lpage::LpageInfo>);

impl PartialEq for LpageRef {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for LpageRef {}

/// A slot's optional dirty bitmap; equality is identity, as for [`RmapsRef`].
#[derive(Debug)]
struct DirtyRef(Option<Arc<DirtyBitmap>>);

impl PartialEq for DirtyRef {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for DirtyRef {}

/// Largest number of pages one memslot may span (KVM's `KVM_MEM_MAX_NR_PAGES`, 2^31 - 1 pages,
/// just under 8 TiB): dirty bitmaps are indexed with an `int`.
pub const KVM_MEM_MAX_NR_PAGES: u64 = (1 << 31) - 1;

bitflags! {
    /// Flags of a memory region, as userspace passes them (`KVM_MEM_*`).
    ///
    /// Unknown bits can be carried (`MemFlags::from_bits_retain`) so that `plan_change` can report
    /// them as [`super::MemslotError::UnknownFlags`] rather than silently dropping them.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct MemFlags: u32 {
        /// Record guest writes in a dirty bitmap (`KVM_MEM_LOG_DIRTY_PAGES`).
        const LOG_DIRTY_PAGES = 1;
        /// The guest may only read the slot; writes exit to userspace (`KVM_MEM_READONLY`).
        const READONLY = 2;
    }
}

/// The argument of `set_user_memory_region` (`struct kvm_userspace_memory_region`).
///
/// `size == 0` asks to delete the slot. Nothing here is trusted: `plan_change` validates every
/// field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    /// The slot to create, change or delete (below [`SlotId::MAX`]).
    pub slot: SlotId,
    /// The address space of the slot (0 = normal, 1 = SMM on x86).
    pub as_id: AsId,
    /// `KVM_MEM_*` flags.
    pub flags: MemFlags,
    /// First guest physical address; page aligned.
    pub gpa: Gpa,
    /// Size in bytes; a multiple of the page size; 0 deletes the slot.
    pub size: u64,
    /// Host virtual address backing `gpa`; page aligned.
    pub hva: Hva,
}

impl MemoryRegion {
    /// A region of address space 0 with no flags: `size` bytes of guest memory at `gpa`, backed
    /// by host memory at `hva`. Set [`MemoryRegion::as_id`] or [`MemoryRegion::flags`] (or use
    /// [`MemoryRegion::with_flags`]) for the others; `size` 0 asks to delete the slot.
    pub fn new(slot: SlotId, gpa: Gpa, size: u64, hva: Hva) -> MemoryRegion {
        MemoryRegion {
            slot,
            as_id: AsId::new(0),
            flags: MemFlags::empty(),
            gpa,
            size,
            hva,
        }
    }

    /// The same region with `flags`.
    pub fn with_flags(self, flags: MemFlags) -> MemoryRegion {
        MemoryRegion { flags, ..self }
    }

    /// The same region in address space `as_id`.
    pub fn in_address_space(self, as_id: AsId) -> MemoryRegion {
        MemoryRegion { as_id, ..self }
    }

    /// The request that deletes this region's slot (`size` 0).
    pub fn deletion(self) -> MemoryRegion {
        MemoryRegion { size: 0, ..self }
    }
}

/// A guest memory slot: `npages` guest frames from `base_gfn`, backed by host memory from
/// `userspace_addr`.
///
/// Immutable once built (module invariant 1); published sets share it through `Arc`.
#[derive(Debug, PartialEq, Eq)]
pub struct Memslot {
    /// The shadow MMU's rmap arrays (`slot->arch.rmap`), present only when the VM uses the shadow
    /// MMU; shared by a slot, its INVALID copy and a flags-only successor.
    rmaps: RmapsRef,
    /// `lpage_info`: the `disallow_lpage` counts, shared by the INVALID copy.
    lpage: LpageRef,
    /// The dirty bitmap while the slot has `LOG_DIRTY_PAGES` (`dirty_bitmap`); shared like `rmaps`.
    dirty: DirtyRef,
    id: SlotId,
    as_id: AsId,
    /// `[base_gfn, base_gfn + npages)`, never empty.
    gfns: GfnRange,
    userspace_addr: Hva,
    /// `userspace_addr + npages * PAGE_SIZE`, precomputed so no lookup does that arithmetic.
    hva_end: Hva,
    flags: MemFlags,
    /// `KVM_MEMSLOT_INVALID`: set only on the copy published while a DELETE or MOVE zaps the slot.
    invalid: bool,
}

impl Memslot {
    /// Builds a valid slot, or `None` if the values break module invariant 1 (empty, too many pages,
    /// unaligned host address, or a gfn or hva range that does not fit in 64 bits).
    pub(super) fn from_parts(
        id: SlotId,
        as_id: AsId,
        base_gfn: Gfn,
        npages: u64,
        userspace_addr: Hva,
        flags: MemFlags,
    ) -> Option<Memslot> {
        if npages == 0 || npages > KVM_MEM_MAX_NR_PAGES || !userspace_addr.is_page_aligned() {
            return None;
        }
        let gfns = GfnRange::from_len(base_gfn, npages)?;
        // `gpa + size` must fit, as `plan_change` requires.
        gfns.end().gpa()?;
        let hva_end = userspace_addr.checked_add(npages << PAGE_SHIFT)?;
        let lpage = super::lpage::LpageInfo::new(
            base_gfn.raw(),
            npages,
            super::lpage::hva_page(userspace_addr.raw()),
        );
        Some(Memslot {
            rmaps: RmapsRef(None),
            lpage: LpageRef(Arc::new(lpage)),
            dirty: DirtyRef(None),
            id,
            as_id,
            gfns,
            userspace_addr,
            hva_end,
            flags,
            invalid: false,
        })
    }

    /// The slot id.
    pub fn id(&self) -> SlotId {
        self.id
    }

    /// The address space this slot belongs to.
    pub fn as_id(&self) -> AsId {
        self.as_id
    }

    /// The first guest frame of the slot.
    pub fn base_gfn(&self) -> Gfn {
        self.gfns.start()
    }

    /// Number of 4 KiB pages in the slot (at least 1).
    pub fn npages(&self) -> u64 {
        self.gfns.len()
    }

    /// The page-aligned host address that backs [`Memslot::base_gfn`].
    pub fn userspace_addr(&self) -> Hva {
        self.userspace_addr
    }

    /// The user-visible `KVM_MEM_*` flags (never includes the internal INVALID state).
    pub fn flags(&self) -> MemFlags {
        self.flags
    }

    /// True on the copy published during DELETE or MOVE (`KVM_MEMSLOT_INVALID`): faults on it must
    /// retry, and nothing may install new mappings for it.
    pub fn is_invalid(&self) -> bool {
        self.invalid
    }

    /// The guest frames `[base_gfn, base_gfn + npages)`.
    pub fn gfn_range(&self) -> GfnRange {
        self.gfns
    }

    /// One past the last host address of the slot (`userspace_addr + npages * PAGE_SIZE`).
    pub fn hva_end(&self) -> Hva {
        self.hva_end
    }

    /// The host address backing `gfn` (`__gfn_to_hva_memslot`), or `None` if `gfn` is outside the
    /// slot.
    #[inline]
    pub fn gfn_to_hva(&self, gfn: Gfn) -> Option<Hva> {
        if !self.gfns.contains(gfn) {
            return None;
        }
        // Cannot overflow: gfn - base < npages and userspace_addr + npages pages fits
        // (invariant 1).
        let offset = (gfn.raw() - self.gfns.start().raw()) << PAGE_SHIFT;
        Some(Hva::new(self.userspace_addr.raw() + offset))
    }

    /// The guest frame whose page contains `hva` (`hva_to_gfn_memslot`), or `None` if `hva` is
    /// outside the slot.
    #[inline]
    pub fn hva_to_gfn(&self, hva: Hva) -> Option<Gfn> {
        if hva < self.userspace_addr || hva >= self.hva_end {
            return None;
        }
        Some(self.gfn_at_offset(hva.raw() - self.userspace_addr.raw()))
    }

    /// A copy of this slot marked INVALID, published while a DELETE or MOVE zaps the old mappings.
    pub fn invalid_copy(&self) -> Memslot {
        Memslot {
            invalid: true,
            rmaps: RmapsRef(self.rmaps.0.clone()),
            lpage: self.lpage.clone(),
            dirty: DirtyRef(self.dirty.0.clone()),
            ..*self
        }
    }

    /// The slot's large-page counts (`lpage_info`).
    pub fn lpage_info(&self) -> &super::lpage::LpageInfo {
        &self.lpage.0
    }

    /// The largest level the slot allows for `gfn` (`kvm_mmu_max_mapping_level`'s memslot part):
    /// the whole level block inside the slot, gpa and hva equally aligned, no disallow count.
    #[inline]
    pub fn max_mapping_level(&self, gfn: Gfn) -> crate::addr::Level {
        self.lpage.0.max_level(gfn)
    }

    /// The shadow MMU's rmaps of this slot, if the VM uses the shadow MMU.
    #[inline]
    pub(crate) fn rmaps(&self) -> Option<&SlotRmaps> {
        self.rmaps.0.as_deref()
    }

    /// The shared handle to this slot's rmaps (for a flags-only successor, which keeps them).
    pub(crate) fn rmaps_arc(&self) -> Option<Arc<SlotRmaps>> {
        self.rmaps.0.clone()
    }

    /// The dirty bitmap, while the slot logs dirty pages.
    #[inline]
    pub fn dirty_bitmap(&self) -> Option<&DirtyBitmap> {
        self.dirty.0.as_deref()
    }

    /// The shared handle to the dirty bitmap (for a successor that keeps logging).
    pub(crate) fn dirty_bitmap_arc(&self) -> Option<Arc<DirtyBitmap>> {
        self.dirty.0.clone()
    }

    /// Attaches (or drops) the dirty bitmap, before the slot is published.
    pub(crate) fn set_dirty_bitmap(&mut self, bitmap: Option<Arc<DirtyBitmap>>) {
        self.dirty = DirtyRef(bitmap);
    }

    /// Attaches rmap arrays (the VM does this for shadow-MMU VMs before publishing the slot).
    pub(crate) fn set_rmaps(&mut self, rmaps: Option<Arc<SlotRmaps>>) {
        self.rmaps = RmapsRef(rmaps);
    }

    /// The guest frames whose pages intersect `[start, end)`, clamped to this slot, as the
    /// hva-range walk builds them (spec §3.1: `hs = max(start, userspace_addr)`,
    /// `he = min(end, hva_end)`, gfns `[hva_to_gfn(hs), hva_to_gfn(he + PAGE_SIZE - 1))`).
    ///
    /// Returns `None` if the ranges do not intersect.
    #[inline]
    pub(super) fn gfns_for_hva_range(&self, start: Hva, end: Hva) -> Option<GfnRange> {
        let hs = start.max(self.userspace_addr);
        let he = end.min(self.hva_end);
        if hs >= he {
            return None;
        }
        let first = self.gfn_at_offset(hs.raw() - self.userspace_addr.raw());
        // Rounding up cannot overflow: he - userspace_addr <= npages * PAGE_SIZE < 2^43.
        let last = self.gfn_at_offset(he.raw() - self.userspace_addr.raw() + (PAGE_SIZE - 1));
        GfnRange::new(first, last)
    }

    /// `base_gfn + (offset >> PAGE_SHIFT)` for a byte offset at most `npages * PAGE_SIZE + 4095`
    /// from `userspace_addr`; the result is at most `base_gfn + npages`, which fits (invariant 1).
    #[inline]
    fn gfn_at_offset(&self, offset: u64) -> Gfn {
        Gfn::new(self.gfns.start().raw() + (offset >> PAGE_SHIFT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UA: u64 = 0x7f00_0000_0000;

    fn slot(base_gfn: u64, npages: u64) -> Memslot {
        Memslot::from_parts(
            SlotId::new(3),
            AsId::new(1),
            Gfn::new(base_gfn),
            npages,
            Hva::new(UA),
            MemFlags::LOG_DIRTY_PAGES,
        )
        .expect("valid test slot")
    }

    #[test]
    fn gfn_to_hva_is_exact_at_slot_edges() {
        let s = slot(0x100, 16);
        assert_eq!(s.gfn_to_hva(Gfn::new(0x100)), Some(Hva::new(UA)));
        assert_eq!(
            s.gfn_to_hva(Gfn::new(0x10f)),
            Some(Hva::new(UA + 15 * PAGE_SIZE))
        );
        assert_eq!(s.gfn_to_hva(Gfn::new(0xff)), None);
        assert_eq!(s.gfn_to_hva(Gfn::new(0x110)), None);
        assert_eq!(s.hva_end(), Hva::new(UA + 16 * PAGE_SIZE));
    }

    #[test]
    fn hva_to_gfn_is_exact_at_slot_edges() {
        let s = slot(0x100, 16);
        assert_eq!(s.hva_to_gfn(Hva::new(UA)), Some(Gfn::new(0x100)));
        assert_eq!(
            s.hva_to_gfn(Hva::new(UA + PAGE_SIZE - 1)),
            Some(Gfn::new(0x100))
        );
        assert_eq!(
            s.hva_to_gfn(Hva::new(UA + 16 * PAGE_SIZE - 1)),
            Some(Gfn::new(0x10f))
        );
        assert_eq!(s.hva_to_gfn(Hva::new(UA + 16 * PAGE_SIZE)), None);
        assert_eq!(s.hva_to_gfn(Hva::new(UA - 1)), None);
    }

    #[test]
    fn conversions_round_trip_over_the_whole_slot() {
        let s = slot(0x200, 64);
        for gfn in s.gfn_range().start().raw()..s.gfn_range().end().raw() {
            let hva = s.gfn_to_hva(Gfn::new(gfn)).expect("gfn inside the slot");
            assert_eq!(s.hva_to_gfn(hva), Some(Gfn::new(gfn)));
            assert_eq!(s.hva_to_gfn(Hva::new(hva.raw() + 123)), Some(Gfn::new(gfn)));
        }
    }

    #[test]
    fn conversions_are_exact_at_the_top_of_the_address_space() {
        // The highest slot allowed: its exclusive gpa and hva ends are the last page of each
        // 64-bit space, since both must be representable.
        let top_gfn = (u64::MAX >> PAGE_SHIFT) - 1;
        let top_hva = u64::MAX - (2 * PAGE_SIZE - 1);
        let make = |gfn: u64, hva: u64| {
            Memslot::from_parts(
                SlotId::new(0),
                AsId::new(0),
                Gfn::new(gfn),
                1,
                Hva::new(hva),
                MemFlags::empty(),
            )
        };
        let s = make(top_gfn, top_hva).expect("the page below the last fits");
        assert_eq!(s.hva_end(), Hva::new(u64::MAX - (PAGE_SIZE - 1)));
        assert_eq!(s.gfn_to_hva(Gfn::new(top_gfn)), Some(Hva::new(top_hva)));
        assert_eq!(
            s.hva_to_gfn(Hva::new(top_hva + PAGE_SIZE - 1)),
            Some(Gfn::new(top_gfn))
        );
        assert_eq!(s.hva_to_gfn(s.hva_end()), None);
        assert_eq!(
            s.gfns_for_hva_range(Hva::new(top_hva + 1), Hva::new(u64::MAX)),
            GfnRange::new(Gfn::new(top_gfn), Gfn::new(top_gfn + 1))
        );
        assert!(make(top_gfn + 1, 0).is_none(), "gpa end would be 2^64");
        assert!(
            make(0, top_hva + PAGE_SIZE).is_none(),
            "hva end would be 2^64"
        );
    }

    #[test]
    fn from_parts_rejects_slots_that_break_invariant_1() {
        let make = |gfn: u64, npages: u64, hva: u64| {
            Memslot::from_parts(
                SlotId::new(0),
                AsId::new(0),
                Gfn::new(gfn),
                npages,
                Hva::new(hva),
                MemFlags::empty(),
            )
        };
        assert!(make(0, 0, UA).is_none(), "empty slot");
        assert!(
            make(0, KVM_MEM_MAX_NR_PAGES + 1, UA).is_none(),
            "too many pages"
        );
        assert!(make(0, 1, UA + 1).is_none(), "unaligned hva");
        assert!(
            make(u64::MAX >> PAGE_SHIFT, 2, UA).is_none(),
            "gpa end overflows"
        );
        assert!(
            make(0, 2, u64::MAX - (PAGE_SIZE - 1)).is_none(),
            "hva end overflows"
        );
        assert!(
            make(0, KVM_MEM_MAX_NR_PAGES, UA).is_some(),
            "the largest slot is allowed"
        );
    }

    #[test]
    fn invalid_copy_keeps_every_field_and_sets_invalid() {
        let s = slot(0x100, 16);
        let inv = s.invalid_copy();
        assert!(!s.is_invalid());
        assert!(inv.is_invalid());
        assert_eq!(inv.id(), s.id());
        assert_eq!(inv.as_id(), s.as_id());
        assert_eq!(inv.gfn_range(), s.gfn_range());
        assert_eq!(inv.userspace_addr(), s.userspace_addr());
        assert_eq!(inv.flags(), s.flags());
    }

    #[test]
    fn hva_range_gfns_clamp_to_the_slot_and_round_out_partial_pages() {
        let s = slot(0x100, 16);
        let r = |a: u64, b: u64| s.gfns_for_hva_range(Hva::new(a), Hva::new(b));
        let g = |a: u64, b: u64| GfnRange::new(Gfn::new(a), Gfn::new(b));
        // Covers the whole slot and more on both sides: clamped.
        assert_eq!(r(0, u64::MAX), g(0x100, 0x110));
        // Exactly one page.
        assert_eq!(r(UA + PAGE_SIZE, UA + 2 * PAGE_SIZE), g(0x101, 0x102));
        // One byte in the middle of a page: that page.
        assert_eq!(r(UA + PAGE_SIZE + 5, UA + PAGE_SIZE + 6), g(0x101, 0x102));
        // Straddling a page boundary: both pages.
        assert_eq!(r(UA + PAGE_SIZE - 1, UA + PAGE_SIZE + 1), g(0x100, 0x102));
        // Disjoint on either side.
        assert_eq!(r(0, UA), None);
        assert_eq!(r(UA + 16 * PAGE_SIZE, u64::MAX), None);
    }
}

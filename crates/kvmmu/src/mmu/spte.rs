//! The SPTE format: one EPT-like 64-bit layout shared by every MMU in the crate
//! (`arch/x86/kvm/mmu/spte.h` and `spte.c`).
//!
//! # Protocol
//! An SPTE word lives in page-table memory that several parties touch at once: the fault path
//! (compare-and-swap under `mmu_lock` read), zappers (`mmu_lock` write), lockless agers (no lock,
//! RCU only) and the simulated CPU's page walker (no lock, RCU only). [`AtomicSpte`] is the only
//! type that reads or writes SPTE memory; [`Spte`] is a plain copy of one word with decoding
//! predicates, and [`SpteKind`] is its decoded shape at a given level.
//!
//! # Invariants
//! 1. A present leaf satisfies the writable triple (spec §1.4): W implies MMU-writable, and
//!    MMU-writable implies host-writable. [`make_spte`] only builds such values.
//! 2. [`Spte::FROZEN`] is not shadow-present and carries neither the Accessed (8) nor the Dirty (9)
//!    bit (spec §4 item 35), so a lockless `fetch_and(!A)` or `fetch_and(!D)` that lands on it after
//!    a racing freeze leaves it bit-for-bit FROZEN.
//! 3. [`Spte::NONPRESENT`] likewise has no A or D bit, for the same reason.
//! 4. Non-leaf SPTEs carry no A bit: the simulated walker never sets A on tables, and aging only
//!    clears A on leaves, so a table pointer is only ever changed by its owner under `mmu_lock`.
//! 5. Once a leaf is reachable by lockless readers it changes only by atomic read-modify-write
//!    whenever [`Spte::needs_atomic_update`] holds (spec §4 item 32), so a concurrent
//!    hardware Dirty-bit set is never lost (spec §4 item 19).
//! 6. A/D-disabled leaves ([`AD_DISABLED_MASK`], `VmConfig::ad_bits = Disabled`): the simulated
//!    CPU sets neither A nor D in them. Their A bit (ignored by hardware with A/D off) is a
//!    software copy of "not marked for access tracking": set exactly while R/X are in place, so
//!    every young test and scan reads A for both formats. Their D bit is set whenever W is
//!    (`W ⇒ D`), the kernel's "writable means dirty" for such SPTEs. A leaf marked for access
//!    tracking ([`mark_for_access_track`]) has R, W, X and A clear and its R/X saved in the
//!    ignored bits 54 and 56; it stays shadow-present, with its pfn, MMU-writable and D.

use core::fmt;

use crate::addr::{Level, Pfn};
use crate::sync::atomic::{AtomicU64, Ordering};

pub use super::access_track::{
    AdBits, age_ad_disabled, make_spte_ad, mark_for_access_track, resolve_access_tracked,
    restore_access_tracked,
};

/// Readable (EPT bit 0).
pub const READABLE_MASK: u64 = 1 << 0;
/// Writable (EPT bit 1; `PT_WRITABLE_MASK`).
pub const WRITABLE_MASK: u64 = 1 << 1;
/// Executable (EPT bit 2).
pub const EXECUTABLE_MASK: u64 = 1 << 2;
/// Page size: a huge leaf at a level above 4K (`PT_PAGE_SIZE_MASK`).
pub const PAGE_SIZE_MASK: u64 = 1 << 7;
/// Accessed (`shadow_accessed_mask`, EPT bit 8).
pub const ACCESSED_MASK: u64 = 1 << 8;
/// Dirty (`shadow_dirty_mask`, EPT bit 9).
pub const DIRTY_MASK: u64 = 1 << 9;
/// Shadow-present (`SPTE_MMU_PRESENT_MASK`): the software "this SPTE is present" bit.
pub const MMU_PRESENT_MASK: u64 = 1 << 11;
/// The pfn (or child table address) field, bits 12..=51 (`SPTE_BASE_ADDR_MASK`).
pub const BASE_ADDR_MASK: u64 = ((1u64 << 52) - 1) & !((1u64 << 12) - 1);
/// A/D disabled for this leaf (`SPTE_TDP_AD_DISABLED`, bit 52): the CPU sets no A/D bits in it,
/// and aging marks it for access tracking instead of clearing A (invariant 6).
pub const AD_DISABLED_MASK: u64 = 1 << 52;
/// Where an access-tracked leaf keeps its R and X bits (`SHADOW_ACC_TRACK_SAVED_BITS_SHIFT`):
/// R at bit 54, X at bit 56, both ignored by hardware.
pub const ACC_TRACK_SAVED_SHIFT: u32 = 54;
/// The bits an access-tracked leaf saves (`SHADOW_ACC_TRACK_SAVED_BITS_MASK`): R and X.
pub const ACC_TRACK_SAVED_MASK: u64 = READABLE_MASK | EXECUTABLE_MASK;
/// The bits marking for access tracking clears (`shadow_acc_track_mask` for EPT): R, W and X.
pub const ACC_TRACK_MASK: u64 = READABLE_MASK | WRITABLE_MASK | EXECUTABLE_MASK;
/// Host-writable (`EPT_SPTE_HOST_WRITABLE`, bit 57).
pub const HOST_WRITABLE_MASK: u64 = 1 << 57;
/// MMU-writable (`EPT_SPTE_MMU_WRITABLE`, bit 58).
pub const MMU_WRITABLE_MASK: u64 = 1 << 58;
/// The value of an empty SPTE (`SHADOW_NONPRESENT_VALUE`, bit 63).
pub const SHADOW_NONPRESENT_VALUE: u64 = 1 << 63;
/// Low bits of [`Spte::FROZEN`]: bits 4, 5, 7 and 10. Unlike the kernel's 0x5a0 this avoids the
/// A (8) and D (9) bits (invariant 2).
const FROZEN_LOW_BITS: u64 = 0x4b0;
/// The highest pfn the pfn field can hold.
pub const MAX_PFN: u64 = BASE_ADDR_MASK >> 12;

/// One SPTE value: a plain copy of a 64-bit page-table entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Spte(u64);

/// The decoded shape of an SPTE at a given level.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SpteKind {
    /// Not shadow-present and not frozen (empty).
    NonPresent,
    /// [`Spte::FROZEN`]: owned by a thread in a multi-step update, or inside a removed table.
    Frozen,
    /// A present non-leaf: points to a child page table.
    Table,
    /// A present leaf: maps a host frame.
    Leaf,
}

impl Spte {
    /// The empty SPTE (`SHADOW_NONPRESENT_VALUE`).
    pub const NONPRESENT: Spte = Spte(SHADOW_NONPRESENT_VALUE);
    /// The frozen SPTE (`FROZEN_SPTE`): not present, no A or D bit (invariant 2).
    pub const FROZEN: Spte = Spte(SHADOW_NONPRESENT_VALUE | FROZEN_LOW_BITS);

    /// The raw 64-bit value.
    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }
    /// Wraps a raw 64-bit value.
    #[inline]
    pub const fn from_raw(raw: u64) -> Spte {
        Spte(raw)
    }
    /// Decodes the SPTE as seen in a table at `level`.
    #[inline]
    pub fn kind(self, level: Level) -> SpteKind {
        if self == Spte::FROZEN {
            SpteKind::Frozen
        } else if !self.is_shadow_present() {
            SpteKind::NonPresent
        } else if self.is_leaf(level) {
            SpteKind::Leaf
        } else {
            SpteKind::Table
        }
    }
    /// Shadow-present: exactly bit 11 (`is_shadow_present_pte`). FROZEN is not present.
    #[inline]
    pub const fn is_shadow_present(self) -> bool {
        self.0 & MMU_PRESENT_MASK != 0
    }
    /// True if an SPTE at `level` is a leaf (`is_last_spte`): level 4K, or the PS bit.
    #[inline]
    pub fn is_leaf(self, level: Level) -> bool {
        level == Level::L4K || self.0 & PAGE_SIZE_MASK != 0
    }
    /// True if the SPTE is a present leaf at `level`.
    #[inline]
    pub fn is_present_leaf(self, level: Level) -> bool {
        self.is_shadow_present() && self.is_leaf(level)
    }
    /// A/D bits are enabled for this SPTE (`spte_ad_enabled`): bit 52 is clear.
    #[inline]
    pub const fn ad_enabled(self) -> bool {
        self.0 & AD_DISABLED_MASK == 0
    }
    /// A present A/D-disabled leaf marked for access tracking (`is_access_track_spte`): R, W and
    /// X are all clear (invariant 6). Any access to it faults; the fast page fault restores it.
    #[inline]
    pub const fn is_access_tracked(self) -> bool {
        self.is_shadow_present() && !self.ad_enabled() && self.0 & ACC_TRACK_MASK == 0
    }
    /// Accessed bit (`is_accessed_spte`); for an A/D-disabled leaf, "not access-tracked"
    /// (invariant 6 keeps the two equal).
    #[inline]
    pub const fn is_accessed(self) -> bool {
        self.0 & ACCESSED_MASK != 0
    }
    /// Dirty bit.
    #[inline]
    pub const fn is_dirty(self) -> bool {
        self.0 & DIRTY_MASK != 0
    }
    /// Hardware-writable bit (`is_writable_pte`).
    #[inline]
    pub const fn is_writable(self) -> bool {
        self.0 & WRITABLE_MASK != 0
    }
    /// Readable bit.
    #[inline]
    pub const fn is_readable(self) -> bool {
        self.0 & READABLE_MASK != 0
    }
    /// MMU-writable bit (`is_mmu_writable_spte`): KVM allows the SPTE to be made writable.
    #[inline]
    pub const fn is_mmu_writable(self) -> bool {
        self.0 & MMU_WRITABLE_MASK != 0
    }
    /// Host-writable bit: the host mapping of the frame was writable when the SPTE was built.
    #[inline]
    pub const fn is_host_writable(self) -> bool {
        self.0 & HOST_WRITABLE_MASK != 0
    }
    /// The pfn field (`spte_to_pfn`); for a non-leaf, the child table's address >> 12.
    #[inline]
    pub const fn pfn(self) -> Pfn {
        Pfn::new((self.0 & BASE_ADDR_MASK) >> 12)
    }
    /// True if a writer holding `mmu_lock` must change this SPTE with an atomic exchange rather
    /// than a plain store (`kvm_tdp_mmu_spte_need_atomic_update`): it is a present leaf and either
    /// the fast page-fault path may make it writable (`!W && MMU-W`) or the CPU may set D
    /// (`W && !D`). The Accessed bit is deliberately excluded: losing an A update is tolerated
    /// because clearing A never flushes the TLB anyway. An A/D-disabled leaf always needs it:
    /// lockless aging may mark it for access tracking and the fast page fault may restore it.
    #[inline]
    pub fn needs_atomic_update(self, level: Level) -> bool {
        if !self.is_present_leaf(level) {
            return false;
        }
        if !self.ad_enabled() {
            return true;
        }
        let w = self.is_writable();
        (!w && self.is_mmu_writable()) || (w && !self.is_dirty())
    }
    /// True if the writable triple (host-writable, MMU-writable, W) is one of the four legal
    /// combinations of spec §1.4 (`check_spte_writable_invariants`).
    #[inline]
    pub const fn writable_triple_is_valid(self) -> bool {
        let host = self.is_host_writable();
        let mmu = self.is_mmu_writable();
        let w = self.is_writable();
        (!mmu || host) && (!w || mmu)
    }
}

impl fmt::Debug for Spte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == Spte::NONPRESENT {
            return write!(f, "Spte(NONPRESENT)");
        }
        if *self == Spte::FROZEN {
            return write!(f, "Spte(FROZEN)");
        }
        write!(f, "Spte({:#018x}", self.0)?;
        if !self.is_shadow_present() {
            return write!(f, " non-present)");
        }
        write!(f, " pfn={:#x}", self.pfn().raw())?;
        let flags = [
            (READABLE_MASK, " R"),
            (WRITABLE_MASK, " W"),
            (EXECUTABLE_MASK, " X"),
            (PAGE_SIZE_MASK, " PS"),
            (ACCESSED_MASK, " A"),
            (DIRTY_MASK, " D"),
            (AD_DISABLED_MASK, " !AD"),
            (READABLE_MASK << ACC_TRACK_SAVED_SHIFT, " savedR"),
            (EXECUTABLE_MASK << ACC_TRACK_SAVED_SHIFT, " savedX"),
            (HOST_WRITABLE_MASK, " HostW"),
            (MMU_WRITABLE_MASK, " MmuW"),
        ];
        for (mask, name) in flags {
            if self.0 & mask != 0 {
                f.write_str(name)?;
            }
        }
        f.write_str(")")
    }
}

/// What the fault path allows a new leaf to do (the inputs of `make_spte` that vary per fault).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct LeafAttrs {
    /// The host mapping of the frame is writable (`host_writable`).
    pub host_writable: bool,
    /// The guest access rights allow writes (`pte_access & ACC_WRITE_MASK`).
    pub write_allowed: bool,
    /// The SPTE is installed speculatively, not because the guest touched the page: it starts
    /// without the Accessed bit.
    pub prefetch: bool,
}

/// Builds a present leaf SPTE (`make_spte`, A/D-enabled format only).
///
/// R and X are always granted; A is set unless `prefetch`; PS is set above 4K; host-writable
/// follows the host mapping; `W | MMU-W | D` are set only when both the guest and the host allow
/// writes (D is set proactively, as the kernel does, since the write is allowed anyway). The
/// result always satisfies the writable triple (invariant 1). Bits of `pfn` beyond the 40-bit field
/// are a caller bug (the frame arena is far smaller) and are checked in debug builds.
pub fn make_spte(pfn: Pfn, level: Level, attrs: LeafAttrs) -> Spte {
    debug_assert!(
        pfn.raw() <= MAX_PFN,
        "pfn {pfn:?} does not fit the SPTE pfn field"
    );
    let mut spte = MMU_PRESENT_MASK | READABLE_MASK | EXECUTABLE_MASK;
    if !attrs.prefetch {
        spte |= ACCESSED_MASK;
    }
    if level > Level::L4K {
        spte |= PAGE_SIZE_MASK;
    }
    if attrs.host_writable {
        spte |= HOST_WRITABLE_MASK;
    }
    spte |= (pfn.raw() << 12) & BASE_ADDR_MASK;
    if attrs.write_allowed && attrs.host_writable {
        spte |= WRITABLE_MASK | MMU_WRITABLE_MASK | DIRTY_MASK;
    }
    Spte(spte)
}

/// Builds a non-leaf SPTE pointing at a child table whose address is `child_addr`
/// (`make_nonleaf_spte`). The address must be 4 KiB aligned and below 2^52. No A bit
/// (invariant 4).
pub(crate) fn make_nonleaf_spte(child_addr: u64) -> Spte {
    assert!(
        child_addr & !BASE_ADDR_MASK == 0,
        "page-table pages are 4 KiB aligned heap objects below 2^52 (TablePtr invariant)"
    );
    Spte(MMU_PRESENT_MASK | READABLE_MASK | WRITABLE_MASK | EXECUTABLE_MASK | child_addr)
}

/// True if replacing leaf `old` by `new` requires a TLB flush before `mmu_lock` is dropped
/// (`leaf_spte_change_needs_tlb_flush`): only losing MMU-writable does. Clearing A, D, or W for
/// dirty logging never needs an immediate flush.
pub fn leaf_spte_change_needs_tlb_flush(old: Spte, new: Spte) -> bool {
    old.is_mmu_writable() && !new.is_mmu_writable()
}

/// One SPTE slot in page-table memory: the only type that reads or writes SPTE memory.
///
/// Ordering rules (every user cites one of these):
/// - **O1, following a table pointer:** a load whose result is dereferenced as a child table uses
///   `Acquire`, pairing with O2, so the child's initialised entries are visible.
/// - **O2, publishing a table:** linking a new child table uses a `Release` (or `AcqRel`)
///   compare-exchange, so its entries are initialised before any walker can reach it.
/// - **O3, leaf updates:** a change to a reachable leaf for which [`Spte::needs_atomic_update`]
///   holds is a read-modify-write (`swap`/`compare_exchange`) whose returned value is taken as the
///   old SPTE, so no concurrent hardware D/W update is lost. Otherwise a plain `store` suffices.
/// - **O4, aging:** clearing Accessed is one `fetch_and(!A)`; it can only lose an A update, never
///   a D or W one, and is harmless on NONPRESENT and FROZEN (which have no A bit).
/// - **O5, hardware A/D:** the simulated CPU sets A/D only on a value it has just checked to be a
///   present leaf allowing the access, with a `compare_exchange` (so A/D never lands on a value
///   that became non-present meanwhile); `fetch_or` is available for models of real hardware.
///
/// Leaf A/D bits carry no data dependencies, so every leaf-only access may be `Relaxed`; the
/// atomicity of the RMW, not its ordering, is what keeps bits from being lost.
#[repr(transparent)]
pub struct AtomicSpte(AtomicU64);

impl AtomicSpte {
    /// A slot holding `v`.
    #[inline]
    pub fn new(v: Spte) -> AtomicSpte {
        AtomicSpte(AtomicU64::new(v.0))
    }
    /// Loads the SPTE (see O1 for when `Acquire` is required).
    #[inline]
    pub fn load(&self, order: Ordering) -> Spte {
        checked(Spte(self.0.load(order)))
    }
    /// Stores `v` (only where O3 allows a plain store, or on a table not yet published).
    #[inline]
    pub fn store(&self, v: Spte, order: Ordering) {
        self.0.store(v.0, order)
    }
    /// Exchanges the SPTE and returns the old value (O3).
    #[inline]
    pub fn swap(&self, v: Spte, order: Ordering) -> Spte {
        checked(Spte(self.0.swap(v.0, order)))
    }
    /// Compare-and-exchange: `Ok(previous)` if the slot held `current`, else `Err(actual)`.
    #[inline]
    pub fn compare_exchange(
        &self,
        current: Spte,
        new: Spte,
        success: Ordering,
        failure: Ordering,
    ) -> Result<Spte, Spte> {
        self.0
            .compare_exchange(current.0, new.0, success, failure)
            .map(|v| checked(Spte(v)))
            .map_err(|v| checked(Spte(v)))
    }
    /// Stores the loom poison value into a freed table (table.rs).
    #[cfg(loom)]
    pub(crate) fn store_poison(&self, v: Spte, order: Ordering) {
        self.0.store(v.0, order)
    }
    /// Atomically ANDs `mask` into the SPTE and returns the old value (O4).
    #[inline]
    pub fn fetch_and(&self, mask: u64, order: Ordering) -> Spte {
        checked(Spte(self.0.fetch_and(mask, order)))
    }
    /// Atomically ORs `bits` into the SPTE and returns the old value (O5).
    #[inline]
    pub fn fetch_or(&self, bits: u64, order: Ordering) -> Spte {
        checked(Spte(self.0.fetch_or(bits, order)))
    }
}

/// Under loom, every access to SPTE memory asserts it did not read a freed (poisoned) table.
#[inline(always)]
fn checked(v: Spte) -> Spte {
    #[cfg(loom)]
    assert_ne!(
        v,
        crate::mmu::tdp::table::POISON,
        "read SPTE memory of a freed page-table page (spec §4 item 29/20: use after free)"
    );
    v
}

impl fmt::Debug for AtomicSpte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // ORDERING: a diagnostic snapshot; it orders nothing.
        self.load(Ordering::Relaxed).fmt(f)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_round_trips() {
        let pfn = Pfn::new(0x12_3456_789a);
        let attrs = LeafAttrs {
            host_writable: true,
            write_allowed: true,
            prefetch: false,
        };
        let s = make_spte(pfn, Level::L4K, attrs);
        assert_eq!(Spte::from_raw(s.raw()), s);
        assert_eq!(s.pfn(), pfn);
        assert!(s.is_shadow_present() && s.is_accessed() && s.is_dirty() && s.is_writable());
        assert!(s.is_mmu_writable() && s.is_host_writable() && s.is_readable());
        assert_eq!(s.kind(Level::L4K), SpteKind::Leaf);
        assert_eq!(s.raw() & (1 << 8), 1 << 8, "A is bit 8");
        assert_eq!(s.raw() & (1 << 9), 1 << 9, "D is bit 9");
        assert_eq!(s.raw() & (1 << 11), 1 << 11, "present is bit 11");
        assert_eq!(
            (s.raw() >> 12) & ((1 << 40) - 1),
            pfn.raw(),
            "pfn is bits 12-51"
        );
        assert_ne!(s.raw() & (1 << 57), 0, "host-writable is bit 57");
        assert_ne!(s.raw() & (1 << 58), 0, "MMU-writable is bit 58");
        let huge = make_spte(Pfn::new(512), Level::L2M, attrs);
        assert_eq!(huge.kind(Level::L2M), SpteKind::Leaf);
        assert_ne!(huge.raw() & (1 << 7), 0, "PS is bit 7");
        let table = make_nonleaf_spte(0x7f12_3456_7000);
        assert_eq!(table.kind(Level::L2M), SpteKind::Table);
        assert_eq!(table.pfn(), Pfn::new(0x0007_f123_4567));
        assert!(!table.is_accessed(), "non-leaf SPTEs carry no A bit");
        assert_eq!(Spte::NONPRESENT.kind(Level::L4K), SpteKind::NonPresent);
        assert_eq!(Spte::NONPRESENT.raw(), 1 << 63);
        let a = AtomicSpte::new(s);
        assert_eq!(a.load(Ordering::Relaxed), s);
        assert_eq!(a.fetch_and(!ACCESSED_MASK, Ordering::Relaxed), s);
        assert!(!a.load(Ordering::Relaxed).is_accessed());
        assert_eq!(format!("{:?}", Spte::FROZEN), "Spte(FROZEN)");
        assert!(format!("{s:?}").contains(" W"));
    }

    #[test]
    fn frozen_has_no_accessed_or_dirty_and_is_not_present() {
        let f = Spte::FROZEN;
        assert!(!f.is_shadow_present());
        assert!(!f.is_accessed() && !f.is_dirty());
        assert_eq!(f.raw() & (ACCESSED_MASK | DIRTY_MASK), 0);
        assert_eq!(
            f.raw() & (READABLE_MASK | WRITABLE_MASK | EXECUTABLE_MASK),
            0
        );
        assert_ne!(f, Spte::NONPRESENT);
        for level in 1..=4 {
            let level = Level::new(level).unwrap();
            assert_eq!(f.kind(level), SpteKind::Frozen);
            assert!(!f.needs_atomic_update(level));
        }
        // An ager's AND landing on a frozen or empty slot must leave it unchanged.
        let slot = AtomicSpte::new(Spte::FROZEN);
        slot.fetch_and(!ACCESSED_MASK, Ordering::Relaxed);
        slot.fetch_and(!DIRTY_MASK, Ordering::Relaxed);
        assert_eq!(slot.load(Ordering::Relaxed), Spte::FROZEN);
    }

    #[test]
    fn needs_atomic_update_cases() {
        let pfn = Pfn::new(7);
        let w = make_spte(
            pfn,
            Level::L4K,
            LeafAttrs {
                host_writable: true,
                write_allowed: true,
                prefetch: false,
            },
        );
        // W && D: the CPU has nothing left to set.
        assert!(!w.needs_atomic_update(Level::L4K));
        // W && !D: the CPU may set D.
        let w_clean = Spte::from_raw(w.raw() & !DIRTY_MASK);
        assert!(w_clean.needs_atomic_update(Level::L4K));
        // !W && MMU-W: fast page fault may set W without the lock.
        let wrprot_dirty_log = Spte::from_raw(w.raw() & !WRITABLE_MASK);
        assert!(wrprot_dirty_log.needs_atomic_update(Level::L4K));
        // !W && !MMU-W: nothing can change it behind the lock holder's back (A excluded).
        let ro = make_spte(
            pfn,
            Level::L4K,
            LeafAttrs {
                host_writable: true,
                write_allowed: false,
                prefetch: false,
            },
        );
        assert!(!ro.needs_atomic_update(Level::L4K));
        let ro_old = Spte::from_raw(ro.raw() & !ACCESSED_MASK);
        assert!(
            !ro_old.needs_atomic_update(Level::L4K),
            "A is deliberately excluded"
        );
        // Not present, or not a leaf: never.
        assert!(!Spte::NONPRESENT.needs_atomic_update(Level::L4K));
        let table = make_nonleaf_spte(0x1000);
        assert!(!table.needs_atomic_update(Level::L2M));
        // A writable-clean huge leaf needs it too.
        let huge = Spte::from_raw(
            make_spte(
                Pfn::new(512),
                Level::L2M,
                LeafAttrs {
                    host_writable: true,
                    write_allowed: true,
                    prefetch: false,
                },
            )
            .raw()
                & !DIRTY_MASK,
        );
        assert!(huge.needs_atomic_update(Level::L2M));
    }

    #[test]
    fn tlb_flush_only_when_mmu_writable_is_lost() {
        let a = LeafAttrs {
            host_writable: true,
            write_allowed: true,
            prefetch: false,
        };
        let w = make_spte(Pfn::new(1), Level::L4K, a);
        let ro = make_spte(
            Pfn::new(1),
            Level::L4K,
            LeafAttrs {
                write_allowed: false,
                ..a
            },
        );
        assert!(leaf_spte_change_needs_tlb_flush(w, ro));
        assert!(leaf_spte_change_needs_tlb_flush(w, Spte::NONPRESENT));
        assert!(!leaf_spte_change_needs_tlb_flush(
            w,
            Spte::from_raw(w.raw() & !ACCESSED_MASK)
        ));
        assert!(!leaf_spte_change_needs_tlb_flush(
            w,
            Spte::from_raw(w.raw() & !DIRTY_MASK)
        ));
        assert!(!leaf_spte_change_needs_tlb_flush(ro, Spte::NONPRESENT));
    }

    proptest! {
        #[test]
        fn make_spte_keeps_writable_triple_invariant(
            host_writable: bool, write_allowed: bool, prefetch: bool,
            pfn in 0..=MAX_PFN, level in 1u8..=3,
        ) {
            let level = Level::new(level).unwrap();
            let attrs = LeafAttrs { host_writable, write_allowed, prefetch };
            let s = make_spte(Pfn::new(pfn), level, attrs);
            prop_assert!(s.writable_triple_is_valid());
            prop_assert_eq!(s.is_writable(), host_writable && write_allowed);
            prop_assert_eq!(s.is_host_writable(), host_writable);
            prop_assert_eq!(s.is_accessed(), !prefetch);
            prop_assert_eq!(s.pfn(), Pfn::new(pfn));
            prop_assert_eq!(s.kind(level), SpteKind::Leaf);
            prop_assert!(s != Spte::FROZEN && s != Spte::NONPRESENT);
        }
    }
}

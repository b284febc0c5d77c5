//! The dirty ring (`virt/kvm/dirty_ring.c`, `KVM_CAP_DIRTY_LOG_RING`): a per-vCPU ring of dirtied
//! (slot, offset) entries instead of per-slot bitmaps.
//!
//! # Protocol (docs/locking.md "Dirty logging", docs/invariants.md R1–R2)
//! - Each entry goes dirty → collected → reset, as in KVM: the vCPU's fault handler publishes a
//!   dirty entry (fields, then its flags with `Release`); [`Vm::collect_dirty_rings`] takes dirty
//!   entries in order (`Acquire`) and marks them collected; [`Vm::reset_dirty_rings`] walks each
//!   ring from its reset index over collected entries, write-protects their pages under
//!   `mmu_lock` write, frees the entries and flushes remote TLBs before returning. Read a
//!   collected page after the reset that re-armed it (a write between the collection and the
//!   reset goes through the still-writable leaf and is not logged again).
//! - The entry protocol itself is `vm/dirty_ring_core.rs` (also built under loom).
//! - Only the owning vCPU pushes (its faults run on its thread), so the dirty index has one
//!   writer; only resets (under `slots_lock`) move the reset index.
//! - When a push leaves `soft_limit` or more entries in use, the vCPU exits with
//!   [`VcpuExit::DirtyRingFull`](crate::vm::VcpuExit::DirtyRingFull) after that fault, before
//!   retrying the access, and keeps exiting (without faulting) until a reset frees entries; the
//!   `RESERVED` entries above the soft limit are never reached, since a fault pushes at most once
//!   and none starts while the ring is soft-full (R1).
//! - Ring and bitmaps are exclusive per VM: the ring is enabled only before any vCPU exists and
//!   while no slot has a bitmap, and once enabled logging slots get no bitmap.

use crate::addr::{AsId, Gfn, GfnRange, SlotId};
use crate::sync::atomic::Ordering;
use crate::sync::guest_mode::{self, InGuestMode};
use crate::sync::{Arc, Mutex};

use super::dirty_log::DirtyTracking;
use super::memslot::MemFlags;
use super::{Vm, VmInner};

pub use super::dirty_ring_core::DirtyRing;

/// Entries kept free above the soft limit (`KVM_DIRTY_RING_RSVD_ENTRIES`).
pub const DIRTY_RING_RESERVED: u32 = 64;
/// Largest ring (entries).
pub const DIRTY_RING_MAX: u32 = 1 << 20;

/// A dirtied page as [`Vm::collect_dirty_rings`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirtyRingEntry {
    /// The address space of the slot.
    pub as_id: AsId,
    /// The slot.
    pub slot: SlotId,
    /// The page's offset from the slot's base, in pages.
    pub offset: u64,
}

/// The VM's ring state.
#[derive(Debug, Default)]
pub(crate) struct DirtyRingState {
    inner: Mutex<RingsInner>,
}

#[derive(Debug, Default)]
struct RingsInner {
    /// Entries per ring; 0 while the ring is disabled.
    size: u32,
    vcpus_created: u64,
    rings: Vec<Arc<DirtyRing>>,
}

/// Why a dirty-ring call was refused; nothing changed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DirtyRingError {
    /// The size is not a power of two.
    #[error("dirty ring size {0} is not a power of two")]
    NotPowerOfTwo(u32),
    /// The size leaves no room above the reserved entries, or exceeds the maximum.
    #[error("dirty ring size {size} must be between {min} and {max} entries")]
    BadSize {
        /// The refused size.
        size: u32,
        /// The smallest size (twice the reserved entries).
        min: u32,
        /// [`DIRTY_RING_MAX`].
        max: u32,
    },
    /// The ring must be enabled before any vCPU is created.
    #[error("the dirty ring must be enabled before vCPUs are created")]
    VcpusExist,
    /// A memslot already logs into a bitmap (ring and bitmap are exclusive).
    #[error("memslot {slot:?} already logs dirty pages into a bitmap")]
    BitmapInUse {
        /// The slot.
        slot: SlotId,
    },
    /// The ring is already enabled.
    #[error("the dirty ring is already enabled")]
    AlreadyEnabled,
    /// The ring is not enabled.
    #[error("the dirty ring is not enabled")]
    NotEnabled,
    /// The D-bit tracking mode does not fault on writes, so it cannot feed a ring.
    #[error("the dirty ring needs write-protect tracking")]
    DBitTracking,
    /// The VM was torn down.
    #[error("the VM has been torn down")]
    Dead,
    /// The calling thread holds a vCPU in guest mode.
    #[error(transparent)]
    InGuestMode(#[from] InGuestMode),
}

impl Vm {
    /// `KVM_CAP_DIRTY_LOG_RING`: every vCPU created afterwards gets a ring of `entries` entries
    /// (a power of two, at least `2 * DIRTY_RING_RESERVED`); its soft limit is
    /// `entries - DIRTY_RING_RESERVED`. Logging slots then record into the rings, not bitmaps.
    ///
    /// Errors (nothing changes): [`DirtyRingError::NotPowerOfTwo`], [`DirtyRingError::BadSize`],
    /// [`DirtyRingError::VcpusExist`], [`DirtyRingError::BitmapInUse`],
    /// [`DirtyRingError::AlreadyEnabled`], [`DirtyRingError::DBitTracking`],
    /// [`DirtyRingError::Dead`], [`DirtyRingError::InGuestMode`].
    pub fn enable_dirty_ring(&self, entries: u32) -> Result<(), DirtyRingError> {
        guest_mode::check("enable_dirty_ring")?;
        let vm = &self.inner;
        let _slots = vm.slots_lock.lock();
        if vm.dead.load(Ordering::Acquire) {
            return Err(DirtyRingError::Dead);
        }
        if !entries.is_power_of_two() {
            return Err(DirtyRingError::NotPowerOfTwo(entries));
        }
        let min = 2 * DIRTY_RING_RESERVED;
        if !(min..=DIRTY_RING_MAX).contains(&entries) {
            return Err(DirtyRingError::BadSize {
                size: entries,
                min,
                max: DIRTY_RING_MAX,
            });
        }
        if vm.dirty_tracking() == DirtyTracking::DBit {
            return Err(DirtyRingError::DBitTracking);
        }
        for set in &vm.memslots {
            if let Some(s) = set.current().iter().find(|s| s.dirty_bitmap().is_some()) {
                return Err(DirtyRingError::BitmapInUse { slot: s.id() });
            }
        }
        let mut st = vm.dirty_ring.inner.lock();
        if st.size != 0 {
            return Err(DirtyRingError::AlreadyEnabled);
        }
        if st.vcpus_created != 0 {
            return Err(DirtyRingError::VcpusExist);
        }
        st.size = entries;
        Ok(())
    }

    /// Collects every dirty entry of every vCPU's ring, in push order per ring, and marks them
    /// collected (userspace's read of the mmap'ed rings). Re-arm them with
    /// [`Vm::reset_dirty_rings`], then read the pages.
    ///
    /// Errors: [`DirtyRingError::NotEnabled`].
    pub fn collect_dirty_rings(&self) -> Result<Vec<DirtyRingEntry>, DirtyRingError> {
        let st = self.inner.dirty_ring.inner.lock();
        if st.size == 0 {
            return Err(DirtyRingError::NotEnabled);
        }
        let mut out = Vec::new();
        for ring in &st.rings {
            ring.collect(|slot, offset| {
                out.push(DirtyRingEntry {
                    as_id: AsId::new((slot >> 16) as u8),
                    slot: SlotId::new(slot as u16),
                    offset,
                });
            });
        }
        Ok(out)
    }

    /// `KVM_RESET_DIRTY_RINGS`: frees every collected entry (in order, stopping at the first
    /// that is not collected), write-protects its page again, and flushes remote TLBs before
    /// returning. Returns how many entries were reset.
    ///
    /// Errors: [`DirtyRingError::NotEnabled`], [`DirtyRingError::Dead`],
    /// [`DirtyRingError::InGuestMode`].
    pub fn reset_dirty_rings(&self) -> Result<u64, DirtyRingError> {
        guest_mode::check("reset_dirty_rings")?;
        self.inner.reset_dirty_rings()
    }
}

impl VmInner {
    /// The ring a new vCPU gets (counts the vCPU either way, so enabling the ring afterwards is
    /// refused).
    pub(crate) fn dirty_ring_for_new_vcpu(&self) -> Option<Arc<DirtyRing>> {
        let mut st = self.dirty_ring.inner.lock();
        st.vcpus_created += 1;
        if st.size == 0 {
            return None;
        }
        let ring = Arc::new(DirtyRing::new(st.size, DIRTY_RING_RESERVED));
        st.rings.push(Arc::clone(&ring));
        Some(ring)
    }

    /// True once the ring is enabled (logging slots then get no bitmap).
    pub(crate) fn dirty_ring_enabled(&self) -> bool {
        self.dirty_ring.inner.lock().size != 0
    }

    fn reset_dirty_rings(&self) -> Result<u64, DirtyRingError> {
        let _slots = self.slots_lock.lock();
        if self.dead.load(Ordering::Acquire) {
            return Err(DirtyRingError::Dead);
        }
        let rings: Vec<Arc<DirtyRing>> = {
            let st = self.dirty_ring.inner.lock();
            if st.size == 0 {
                return Err(DirtyRingError::NotEnabled);
            }
            st.rings.clone()
        };
        let mut reset = 0u64;
        let mut flush = false;
        let mmu = self.mmu_lock.write();
        // Consecutive entries of one slot within 64 pages are re-armed together, as
        // `kvm_dirty_ring_reset` coalesces them into one mask.
        let mut pending: Option<Pending> = None;
        for ring in &rings {
            reset += ring.reset_collected(|slot, offset| {
                let (as_id, id) = (AsId::new((slot >> 16) as u8), SlotId::new(slot as u16));
                let joined = pending
                    .as_mut()
                    .is_some_and(|p| p.try_add(as_id, id, offset));
                if !joined {
                    if let Some(p) = pending.take() {
                        flush |= self.rearm_ring_pages(&p, mmu.witness());
                    }
                    pending = Some(Pending {
                        as_id,
                        slot: id,
                        base: offset,
                        mask: 1,
                    });
                }
            });
        }
        if let Some(p) = pending.take() {
            flush |= self.rearm_ring_pages(&p, mmu.witness());
        }
        drop(mmu);
        self.flush_after_rearm(flush || reset != 0);
        Ok(reset)
    }

    /// Write-protects the pages of `p` if their slot still exists and logs; true if a leaf
    /// lost W.
    fn rearm_ring_pages(&self, p: &Pending, mmu: &crate::sync::witness::MmuWrite) -> bool {
        let Some(slot) = self
            .memslots
            .get(p.as_id.index())
            .and_then(|set| set.current().get(p.slot).cloned())
        else {
            return false;
        };
        if !slot.flags().contains(MemFlags::LOG_DIRTY_PAGES) || p.base >= slot.npages() {
            return false;
        }
        let base = slot.base_gfn().raw() + p.base;
        let len = (64 - u64::from(p.mask.leading_zeros())).min(slot.npages() - p.base);
        let Some(range) = GfnRange::from_len(Gfn::new(base), len) else {
            return false;
        };
        self.mmu.write_protect_gfns(
            slot.as_id(),
            slot.rmaps(),
            range,
            |g| p.mask & (1 << (g.raw() - base)) != 0,
            mmu,
        )
    }
}

/// Collected entries of one slot within 64 pages of `base`, re-armed together.
struct Pending {
    as_id: AsId,
    slot: SlotId,
    base: u64,
    mask: u64,
}

impl Pending {
    /// Adds `offset` if it belongs to this group.
    fn try_add(&mut self, as_id: AsId, slot: SlotId, offset: u64) -> bool {
        if as_id != self.as_id
            || slot != self.slot
            || offset < self.base
            || offset - self.base >= 64
        {
            return false;
        }
        self.mask |= 1 << (offset - self.base);
        true
    }
}

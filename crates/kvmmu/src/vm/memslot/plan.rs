//! Validating and classifying a `set_user_memory_region` request (`__kvm_set_memory_region`).
//!
//! [`plan_change`] applies KVM's checks in KVM's order, so a request that breaks several rules is
//! reported with the error KVM would have found first, then decides which of the update flows of
//! spec §1.3 the request needs. It reads the active sets and changes nothing.

use core::fmt;

use super::set::Memslots;
use super::slot::{KVM_MEM_MAX_NR_PAGES, MemFlags, MemoryRegion, Memslot};
use crate::addr::{AsId, Gfn, GfnRange, Gpa, Hva, PAGE_SHIFT, SlotId, is_page_aligned};
use crate::geometry::GFN_LIMIT;
use crate::sync::Arc;

/// One past the last user address of x86-64 with 4-level paging: KVM's `access_ok(hva, size)`
/// refuses a memslot whose host range ends above it (measured on the project's hosts by
/// crates/kvmmu-kvm: a slot ending exactly here is accepted, one page further is refused). The
/// simulated host's own `TASK_SIZE` is smaller; a slot above it is valid and its accesses fault.
pub const USER_ADDR_END: u64 = 1 << 47;

/// What a valid request does to its address space (`enum kvm_mr_change`, plus the no-op).
#[derive(Debug)]
pub enum MemslotChange {
    /// A new slot (`KVM_MR_CREATE`).
    Create {
        /// The slot to insert.
        new: Memslot,
    },
    /// Remove a slot (`KVM_MR_DELETE`): publish `old.invalid_copy()`, zap, then remove.
    Delete {
        /// The slot being removed, as the active set holds it.
        old: Arc<Memslot>,
    },
    /// Move a slot to another guest physical base (`KVM_MR_MOVE`); host range, size and
    /// read-only-ness are unchanged. Invalidated and zapped like a delete.
    Move {
        /// The slot at its current base.
        old: Arc<Memslot>,
        /// The slot at its new base.
        new: Memslot,
    },
    /// Only `LOG_DIRTY_PAGES` changes (`KVM_MR_FLAGS_ONLY`): no invalidation, no zap.
    FlagsOnly {
        /// The slot with its current flags.
        old: Arc<Memslot>,
        /// The slot with the requested flags.
        new: Memslot,
    },
    /// The request matches the existing slot exactly: KVM returns 0 and does nothing.
    Unchanged,
}

/// Which limit a too-large memory region breaks (see [`MemslotError::SizeOverflow`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeLimit {
    /// `hva + size` leaves the user address space (overflows, or ends above
    /// [`USER_ADDR_END`]): KVM's `access_ok` fails.
    HvaEnd,
    /// `gpa + size` does not fit in 64 bits.
    GpaEnd,
    /// The region spans more than [`KVM_MEM_MAX_NR_PAGES`] pages.
    MaxPages,
    /// The region ends above the largest guest physical address the MMU can map (x86's
    /// `kvm_arch_prepare_memory_region` checks the last gfn against `kvm_mmu_max_gfn()`; here the
    /// 4-level geometry's 48-bit limit). Checked for a create or a move only.
    MaxGfn,
}

impl fmt::Display for SizeLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeLimit::HvaEnd => write!(
                f,
                "hva + size leaves the user address space (ends above {USER_ADDR_END:#x})"
            ),
            SizeLimit::GpaEnd => {
                f.write_str("gpa + size overflows the 64-bit guest physical space")
            }
            SizeLimit::MaxPages => write!(
                f,
                "it spans more than KVM_MEM_MAX_NR_PAGES ({KVM_MEM_MAX_NR_PAGES}) pages; split it \
                 into several slots"
            ),
            SizeLimit::MaxGfn => write!(
                f,
                "it ends above the largest guest physical address the MMU maps ({:#x})",
                GFN_LIMIT << PAGE_SHIFT
            ),
        }
    }
}

/// Why `set_user_memory_region` rejected a request (KVM returns `-EINVAL` or `-EEXIST`). Each
/// variant carries the offending values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemslotError {
    /// The guest physical address is not page aligned.
    #[error("guest physical address {gpa} is not 4 KiB aligned")]
    UnalignedGpa {
        /// The requested gpa.
        gpa: Gpa,
    },
    /// The host address is not page aligned.
    #[error("host address {hva} is not 4 KiB aligned")]
    UnalignedHva {
        /// The requested hva.
        hva: Hva,
    },
    /// The size is not a multiple of the page size.
    #[error("size {size:#x} is not a multiple of 4 KiB")]
    UnalignedSize {
        /// The requested size in bytes.
        size: u64,
    },
    /// The region does not fit: see `limit`.
    #[error("memory region of {size:#x} bytes at gpa {gpa}, hva {hva} is too large: {limit}")]
    SizeOverflow {
        /// The requested gpa.
        gpa: Gpa,
        /// The requested hva.
        hva: Hva,
        /// The requested size in bytes.
        size: u64,
        /// The limit it breaks.
        limit: SizeLimit,
    },
    /// The slot id is not below [`SlotId::MAX`].
    #[error("slot id {} is out of range: user memslots are 0..{}", slot.get(), SlotId::MAX)]
    SlotIdOutOfRange {
        /// The requested slot id.
        slot: SlotId,
    },
    /// The address space does not exist in this VM.
    #[error(
        "address space {} does not exist: this VM has {nr_address_spaces} address space(s)",
        as_id.get()
    )]
    AsIdOutOfRange {
        /// The requested address space.
        as_id: AsId,
        /// How many address spaces the VM has.
        nr_address_spaces: usize,
    },
    /// Flags outside `LOG_DIRTY_PAGES | READONLY` were set.
    #[error(
        "unsupported memory region flags {bits:#x}: only LOG_DIRTY_PAGES (1) and READONLY (2) exist"
    )]
    UnknownFlags {
        /// The unsupported bits (only those).
        bits: u32,
    },
    /// Creating or moving the slot would overlap another slot's guest physical range in the same
    /// address space (`-EEXIST`).
    #[error(
        "slot {} would overlap the guest physical range of slot {} in the same address space; \
         delete or move that slot first",
        slot.get(),
        with.get()
    )]
    Overlap {
        /// The slot being created or moved.
        slot: SlotId,
        /// The existing slot it would overlap.
        with: SlotId,
    },
    /// An existing slot cannot change size.
    #[error(
        "slot {} cannot change size from {old_size:#x} to {new_size:#x} bytes; delete it and \
         create it again",
        slot.get()
    )]
    ChangeSize {
        /// The slot.
        slot: SlotId,
        /// Its current size in bytes.
        old_size: u64,
        /// The requested size in bytes.
        new_size: u64,
    },
    /// An existing slot cannot change its host address.
    #[error(
        "slot {} cannot change its host address from {old} to {new}; delete it and create it \
         again",
        slot.get()
    )]
    ChangeHva {
        /// The slot.
        slot: SlotId,
        /// Its current host address.
        old: Hva,
        /// The requested host address.
        new: Hva,
    },
    /// An existing slot cannot gain or lose `READONLY`.
    #[error(
        "slot {} cannot change READONLY (flags {old:?} -> {new:?}); delete it and create it again",
        slot.get()
    )]
    ChangeReadonly {
        /// The slot.
        slot: SlotId,
        /// Its current flags.
        old: MemFlags,
        /// The requested flags.
        new: MemFlags,
    },
    /// A delete (size 0) named a slot that does not exist.
    #[error("cannot delete slot {} in address space {}: no such slot", slot.get(), as_id.get())]
    DeleteNonexistent {
        /// The requested slot id.
        slot: SlotId,
        /// The requested address space.
        as_id: AsId,
    },
}

/// Validates `req` against the active sets and classifies it (`__kvm_set_memory_region`).
///
/// `sets` holds the active set of every address space, indexed by address-space id, so
/// `sets.len()` is the number of address spaces. Checks run in KVM's order: slot id, flags, size,
/// gpa and hva alignment (with `hva + size`), address space, `gpa + size`, page count; then a
/// delete needs an existing slot, a change to an existing slot may only move it or flip
/// `LOG_DIRTY_PAGES`, and a create or move must not overlap another slot of the same address space
/// (other address spaces may map the same gfns; any slots may share host memory).
///
/// Changes nothing: applying the result is the caller's job.
pub fn plan_change(sets: &[&Memslots], req: &MemoryRegion) -> Result<MemslotChange, MemslotError> {
    // The ioctl entry (`kvm_vm_ioctl_set_memory_region`) rejects non-user slot ids before
    // `__kvm_set_memory_region` looks at anything else.
    if req.slot.get() >= SlotId::MAX {
        return Err(MemslotError::SlotIdOutOfRange { slot: req.slot });
    }
    let unknown = req.flags.bits() & !MemFlags::all().bits();
    if unknown != 0 {
        return Err(MemslotError::UnknownFlags { bits: unknown });
    }
    if !is_page_aligned(req.size) {
        return Err(MemslotError::UnalignedSize { size: req.size });
    }
    if !req.gpa.is_page_aligned() {
        return Err(MemslotError::UnalignedGpa { gpa: req.gpa });
    }
    if !req.hva.is_page_aligned() {
        return Err(MemslotError::UnalignedHva { hva: req.hva });
    }
    let too_large = |limit| MemslotError::SizeOverflow {
        gpa: req.gpa,
        hva: req.hva,
        size: req.size,
        limit,
    };
    // `access_ok(hva, size)`: the whole range, even of a delete, lies in user space.
    if req
        .hva
        .checked_add(req.size)
        .is_none_or(|end| end.raw() > USER_ADDR_END)
    {
        return Err(too_large(SizeLimit::HvaEnd));
    }
    let Some(set) = sets.get(req.as_id.index()) else {
        return Err(MemslotError::AsIdOutOfRange {
            as_id: req.as_id,
            nr_address_spaces: sets.len(),
        });
    };
    debug_assert_eq!(
        set.as_id(),
        req.as_id,
        "plan_change: sets must be indexed by as_id"
    );
    if req.gpa.checked_add(req.size).is_none() {
        return Err(too_large(SizeLimit::GpaEnd));
    }
    let npages = req.size >> PAGE_SHIFT;
    if npages > KVM_MEM_MAX_NR_PAGES {
        return Err(too_large(SizeLimit::MaxPages));
    }

    let old = set.get(req.slot);
    if req.size == 0 {
        return match old {
            Some(old) => Ok(MemslotChange::Delete {
                old: Arc::clone(old),
            }),
            None => Err(MemslotError::DeleteNonexistent {
                slot: req.slot,
                as_id: req.as_id,
            }),
        };
    }

    let base_gfn = req.gpa.gfn();
    let new = || {
        Memslot::from_parts(req.slot, req.as_id, base_gfn, npages, req.hva, req.flags)
            .expect("plan_change checked alignment, overflow and page count (memslot invariant 1)")
    };
    let Some(old) = old else {
        check_overlap(set, req.slot, base_gfn, npages)?;
        check_max_gfn(req, base_gfn, npages)?;
        return Ok(MemslotChange::Create { new: new() });
    };
    if req.hva != old.userspace_addr() {
        return Err(MemslotError::ChangeHva {
            slot: req.slot,
            old: old.userspace_addr(),
            new: req.hva,
        });
    }
    if npages != old.npages() {
        return Err(MemslotError::ChangeSize {
            slot: req.slot,
            old_size: old.npages() << PAGE_SHIFT,
            new_size: req.size,
        });
    }
    if (req.flags ^ old.flags()).contains(MemFlags::READONLY) {
        return Err(MemslotError::ChangeReadonly {
            slot: req.slot,
            old: old.flags(),
            new: req.flags,
        });
    }
    if base_gfn != old.base_gfn() {
        check_overlap(set, req.slot, base_gfn, npages)?;
        check_max_gfn(req, base_gfn, npages)?;
        Ok(MemslotChange::Move {
            old: Arc::clone(old),
            new: new(),
        })
    } else if req.flags != old.flags() {
        Ok(MemslotChange::FlagsOnly {
            old: Arc::clone(old),
            new: new(),
        })
    } else {
        Ok(MemslotChange::Unchanged)
    }
}

/// x86's `kvm_arch_prepare_memory_region` refuses a created or moved slot whose last gfn the MMU
/// cannot map; it runs after the overlap check (in `kvm_set_memslot`), so an overlap wins.
fn check_max_gfn(req: &MemoryRegion, base_gfn: Gfn, npages: u64) -> Result<(), MemslotError> {
    if base_gfn.raw() + npages > GFN_LIMIT {
        return Err(MemslotError::SizeOverflow {
            gpa: req.gpa,
            hva: req.hva,
            size: req.size,
            limit: SizeLimit::MaxGfn,
        });
    }
    Ok(())
}

/// `kvm_check_memslot_overlap`: fails if `[base_gfn, base_gfn + npages)` overlaps a slot of `set`
/// other than `id` (a move may overlap its own old range). O(log n + 1): gfn ranges in a set are
/// sorted and disjoint, so at most the slots around the new range's start can clash first.
fn check_overlap(
    set: &Memslots,
    id: SlotId,
    base_gfn: Gfn,
    npages: u64,
) -> Result<(), MemslotError> {
    // Deliberately broken build (negative differential test in crates/kvmmu-kvm): no overlap check.
    if cfg!(feature = "broken-accept-overlapping-slots") {
        return Ok(());
    }
    let range = GfnRange::from_len(base_gfn, npages)
        .expect("plan_change checked gpa + size (memslot invariant 1)");
    match set.first_overlap(range, id) {
        Some(with) => Err(MemslotError::Overlap { slot: id, with }),
        None => Ok(()),
    }
}
